// Node.js's two Redis clients through respire, in their cluster modes (driven by
// examples/node-clients.sh): ioredis's Redis.Cluster and node-redis's createCluster, which
// read CLUSTER SLOTS and find respire as one node owning every slot, then node-redis with
// RESP3. Each check prints "ok" or "FAIL"; the exit code is 1 if any failed.
//
//   node examples/node-clients.js PORT [MASTER_PID]
//
// With MASTER_PID, a load of writes and reads runs through ioredis's cluster client while
// that master is killed (SIGKILL): respire holds the requests for its slots until the
// replica takes over, so the client sees no error and every acknowledged write reads back.
'use strict';
const Redis = require('ioredis');
const { createCluster, createClient } = require('redis');

const port = Number(process.argv[2]);
const masterPid = process.argv[3] ? Number(process.argv[3]) : null;
const seed = [{ host: '127.0.0.1', port }];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function check(what, got, want) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g === w) {
    console.log(`ok   ${what}`);
  } else {
    console.log(`FAIL ${what}: got ${g}, want ${w}`);
    process.exitCode = 1;
  }
}

async function ioredisCluster() {
  const c = new Redis.Cluster(seed);
  await c.set('io:a', '1');
  check('ioredis: GET', await c.get('io:a'), '1');
  const p = c.pipeline();
  for (let i = 0; i < 100; i++) p.set(`io:k${i}`, i);
  for (let i = 0; i < 100; i++) p.get(`io:k${i}`);
  const replies = await p.exec();
  check('ioredis: pipeline of 200 over every slot', replies[150], [null, '50']);
  check('ioredis: MGET in one slot', await c.mget('{io}x', '{io}y'), [null, null]);
  check(
    'ioredis: MULTI/EXEC',
    await c.multi().set('{io}t', 1).incr('{io}t').exec(),
    [[null, 'OK'], [null, 2]],
  );
  check('ioredis: EVAL', await c.eval("return redis.call('GET', KEYS[1])", 1, 'io:a'), '1');
  check('ioredis: one master, respire', c.nodes('master').length, 1);
  const keys = [];
  await new Promise((resolve, reject) => {
    const s = c.nodes('master')[0].scanStream({ match: 'io:k*', count: 1000 });
    s.on('data', (k) => keys.push(...k));
    s.on('end', resolve);
    s.on('error', reject);
  });
  check('ioredis: SCAN finds every key', keys.length, 100);
  let err = null;
  try {
    await c.call('NOSUCHCOMMAND');
  } catch (e) {
    err = e.message.split(',')[0];
  }
  check('ioredis: unknown command', err, "ERR unknown command 'NOSUCHCOMMAND'");

  const sub = new Redis.Cluster(seed);
  let got = null;
  sub.on('message', (_ch, msg) => {
    got = msg;
  });
  await sub.subscribe('io:ch');
  check('ioredis: PUBLISH counts the subscriber', await c.publish('io:ch', 'hello'), 1);
  await sleep(200);
  check('ioredis: message received', got, 'hello');
  sub.disconnect();
  c.disconnect();
}

async function nodeRedisCluster() {
  const c = createCluster({ rootNodes: [{ url: `redis://127.0.0.1:${port}` }] });
  c.on('error', (e) => console.log(`node-redis error: ${e.message}`));
  await c.connect();
  await c.set('nr:b', '2');
  check('node-redis: GET', await c.get('nr:b'), '2');
  await Promise.all(Array.from({ length: 200 }, (_, i) => c.incr(`nr:n${i % 20}`)));
  check('node-redis: 200 concurrent INCRs', await c.get('nr:n3'), '10');
  check('node-redis: MULTI/EXEC', await c.multi().set('{nr}a', '1').get('{nr}a').exec(), ['OK', '1']);
  let got = null;
  await c.subscribe('nr:ch', (msg) => {
    got = msg;
  });
  await c.publish('nr:ch', 'x');
  await sleep(200);
  check('node-redis: SUBSCRIBE', got, 'x');
  await c.sSubscribe('nr:sch', (msg) => {
    got = msg;
  });
  await c.sPublish('nr:sch', 'y');
  await sleep(200);
  check('node-redis: SSUBSCRIBE', got, 'y');
  await c.close();
}

async function nodeRedisResp3() {
  const c = createClient({ url: `redis://127.0.0.1:${port}`, RESP: 3 });
  c.on('error', (e) => console.log(`node-redis error: ${e.message}`));
  await c.connect();
  await c.hSet('nr:h', { f: 'v' });
  check('node-redis RESP3: HGETALL', await c.hGetAll('nr:h'), { f: 'v' });
  await c.close();
}

// Writers through ioredis's cluster client while a master is killed.
async function ioredisAcrossKill() {
  const c = new Redis.Cluster(seed, { maxRedirections: 16 });
  const acked = new Map();
  let errors = 0;
  let slowest = 0;
  const until = Date.now() + 12000;
  const killAt = Date.now() + 2000;
  let killed = false;
  const writer = async (w) => {
    for (let n = 0; n < 1e6 && Date.now() < until; n++) {
      if (!killed && Date.now() >= killAt) {
        killed = true;
        process.kill(masterPid, 'SIGKILL');
      }
      const key = `kill:${w}:${n}`;
      const t = Date.now();
      try {
        await c.set(key, String(n));
        acked.set(key, String(n));
      } catch (e) {
        errors += 1;
      }
      slowest = Math.max(slowest, Date.now() - t);
    }
  };
  await Promise.all(Array.from({ length: 8 }, (_, w) => writer(w)));
  const keys = [...acked.keys()];
  let lost = 0;
  for (let i = 0; i < keys.length; i += 500) {
    const part = keys.slice(i, i + 500);
    const p = c.pipeline();
    part.forEach((k) => p.get(k));
    const got = await p.exec();
    got.forEach(([, v], j) => {
      if (v !== acked.get(part[j])) lost += 1;
    });
  }
  console.log(`     ${acked.size} writes acknowledged, slowest ${slowest} ms (the promotion)`);
  check('ioredis across a killed master: errors', errors, 0);
  check('ioredis across a killed master: acknowledged writes lost', lost, 0);
  c.disconnect();
}

(async () => {
  const runs = [ioredisCluster, nodeRedisCluster, nodeRedisResp3];
  if (masterPid) runs.push(ioredisAcrossKill);
  for (const run of runs) {
    try {
      await run();
    } catch (e) {
      console.log(`FAIL ${run.name}: ${e.stack}`);
      process.exitCode = 1;
    }
  }
  // Clients that reconnect keep timers alive: leave once every check has run.
  setTimeout(() => process.exit(), 100);
})();
