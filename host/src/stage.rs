//! The plugin stage of a worker: every session's commands and replies that need plugin hooks
//! go through the chain together, once per turn of the worker's event loop.
//!
//! A call into a plugin costs about a microsecond whatever it carries, so what matters is how
//! many commands share a call. A pipelining client brings its own batch; clients that send one
//! command at a time do not — but many of them become readable in the same turn of the event
//! loop. Sessions hand their commands (and replies) to the stage and wait; the stage's task is
//! woken by the first of them and, since tokio runs woken tasks in order, runs after every
//! session that was ready in this turn has handed its share over. It then calls each plugin
//! once for all of them and hands every session its decisions back.
//!
//! A batch whose commands no request hook asks for (no plugin sees them, or only plugins with
//! a response side do) does not come here: the session decides it itself.
//!
//! Order is kept per session: a session waiting for its decisions reads nothing further, and
//! one waiting for its replies' hooks writes no later reply before them. Replies for hooks
//! that only observe are written at once: the stage gets copies and nobody waits for them.
//! The stage also makes the traffic metrics sessions recorded visible, once per turn.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::{Poll, Waker};

use bytes::Bytes;

use crate::channel::{self, Receiver, Sender};
use crate::commands::Resolved;
use crate::plugin::{ChainRequest, ChainResponse, ClientHandle, Decision, ResponseChain};
use crate::protocol::Command;
use crate::server::Worker;

/// The request chain's decision for a command, with the response hooks owed for its reply.
pub type PreDecision = (Decision, Option<Box<ResponseChain>>);

/// The decision for a command the plugins do not see (commands they are never shown, such
/// as `AUTH`, and commands no plugin asked for): continue, no response hooks.
pub fn unseen() -> PreDecision {
    (
        Decision::Continue {
            rewritten: None,
            cache: None,
            gate: None,
        },
        None,
    )
}

/// A command read from a client with its entry in the command table, looked up once.
pub type ResolvedCommand = (Command, Resolved<'static>);

/// A session's commands, each with its decision: made by the session when it needs no request
/// hook, by the stage otherwise (`None` until then; one left `None` is decided when handled).
pub type Decided = Vec<(ResolvedCommand, Option<PreDecision>)>;

/// A session's commands for the request hooks, in order: those without a decision yet come
/// back with the chain's (the others as they are).
struct Requests {
    client: ClientHandle,
    cmds: Decided,
    done: Sender<Decided>,
}

/// A session's replies, in order, each with the response hooks it owes (if any).
struct Responses {
    client: ClientHandle,
    replies: Vec<(Bytes, Option<Box<ResponseChain>>)>,
    done: Sender<Vec<Bytes>>,
}

/// A reply already written, for response hooks that only observe.
struct Observed {
    client: ClientHandle,
    reply: Bytes,
    chain: Box<ResponseChain>,
}

/// What sessions handed over since the stage last ran.
#[derive(Default)]
pub struct Stage {
    requests: RefCell<Vec<Requests>>,
    responses: RefCell<Vec<Responses>>,
    observed: RefCell<Vec<Observed>>,
    /// Traffic metrics were recorded: flush them this turn.
    flush: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Stage {
    /// Hands commands over; their decisions (with the commands) arrive on the receiver.
    pub fn submit_requests(&self, client: ClientHandle, cmds: Decided) -> Receiver<Decided> {
        let (done, rx) = channel::oneshot();
        self.requests
            .borrow_mut()
            .push(Requests { client, cmds, done });
        self.wake();
        rx
    }

    /// Hands replies over; the replies to send (replaced or not) arrive on the receiver.
    pub fn submit_responses(
        &self,
        client: ClientHandle,
        replies: Vec<(Bytes, Option<Box<ResponseChain>>)>,
    ) -> Receiver<Vec<Bytes>> {
        let (done, rx) = channel::oneshot();
        self.responses.borrow_mut().push(Responses {
            client,
            replies,
            done,
        });
        self.wake();
        rx
    }

    /// Hands over a reply that was written already, for the observing hooks its chain owes.
    pub fn submit_observed(&self, client: ClientHandle, reply: Bytes, chain: Box<ResponseChain>) {
        self.observed.borrow_mut().push(Observed {
            client,
            reply,
            chain,
        });
        self.wake();
    }

    /// Asks for the worker's traffic metrics to be flushed at the end of this turn.
    pub fn flush_later(&self) {
        if !self.flush.replace(true) {
            self.wake();
        }
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// The stage's task: runs the chain on what was handed over, each time something was.
pub async fn run(worker: Rc<Worker>) {
    loop {
        std::future::poll_fn(|cx| {
            let stage = &worker.stage;
            if stage.requests.borrow().is_empty()
                && stage.responses.borrow().is_empty()
                && stage.observed.borrow().is_empty()
                && !stage.flush.get()
            {
                worker.stage.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        let requests = std::mem::take(&mut *worker.stage.requests.borrow_mut());
        if !requests.is_empty() {
            run_requests(&worker, requests);
        }
        let responses = std::mem::take(&mut *worker.stage.responses.borrow_mut());
        if !responses.is_empty() {
            run_responses(&worker, responses);
        }
        let observed = std::mem::take(&mut *worker.stage.observed.borrow_mut());
        if !observed.is_empty() {
            let batch: Vec<ChainResponse<'_>> = observed
                .iter()
                .map(|o| ChainResponse {
                    client: &o.client,
                    chain: &o.chain,
                    reply: &o.reply,
                })
                .collect();
            worker.plugins.borrow_mut().on_responses(&batch, false);
        }
        // Traffic metrics recorded by sessions, or above for held replies.
        worker.stage.flush.set(false);
        worker.plugins.borrow_mut().flush_metrics();
    }
}

fn run_requests(worker: &Rc<Worker>, mut subs: Vec<Requests>) {
    let table = worker.shared.commands;
    let set = worker.plugin_set();
    let decisions = {
        let batch: Vec<ChainRequest<'_>> = subs
            .iter()
            .flat_map(|s| {
                s.cmds
                    .iter()
                    .filter(|(_, d)| d.is_none())
                    .map(|((cmd, res), _)| ChainRequest {
                        client: &s.client,
                        cmd,
                        info: res.info,
                    })
            })
            .collect();
        worker.plugins.borrow_mut().on_requests(&set, table, &batch)
    };
    let mut decisions = decisions.into_iter();
    for s in &mut subs {
        for (_, d) in s.cmds.iter_mut().filter(|(_, d)| d.is_none()) {
            *d = decisions.next();
        }
    }
    for s in subs {
        s.done.send(s.cmds);
    }
}

fn run_responses(worker: &Rc<Worker>, subs: Vec<Responses>) {
    let mut replaced = {
        let batch: Vec<ChainResponse<'_>> = subs
            .iter()
            .flat_map(|s| {
                s.replies.iter().filter_map(|(reply, chain)| {
                    chain.as_deref().map(|chain| ChainResponse {
                        client: &s.client,
                        chain,
                        reply,
                    })
                })
            })
            .collect();
        worker
            .plugins
            .borrow_mut()
            .on_responses(&batch, true)
            .into_iter()
    };
    for s in subs {
        let out = s
            .replies
            .into_iter()
            .map(
                |(reply, chain)| match chain.and_then(|_| replaced.next().flatten()) {
                    Some(r) => Bytes::from(r),
                    None => reply,
                },
            )
            .collect();
        s.done.send(out);
    }
}
