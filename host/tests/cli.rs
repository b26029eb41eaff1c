//! The command line: `--help`, `--version`, `check`, and every example configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

fn respire(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_respire"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_version() {
    let (ok, out, _) = respire(&["--help"]);
    assert!(ok);
    for flag in [
        "--config",
        "--listen",
        "--backend",
        "--cluster",
        "--shards",
        "--plugins",
        "--metrics",
        "--workers",
        "--requirepass",
        "--backend-password",
        "--sentinel",
        "--master-name",
        "check",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
    let (ok, out, _) = respire(&["--version"]);
    assert!(ok);
    assert!(out.starts_with("respire "), "{out}");
}

#[test]
fn check_accepts_every_example_config() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, out, err) = respire(&["check", "--config", path.to_str().unwrap()]);
            assert!(ok, "{}: {err}", path.display());
            assert!(out.contains("valid"), "{out}");
            n += 1;
        }
    }
    assert!(n >= 1, "no example configs found in {}", examples.display());
}

#[test]
fn check_rejects_bad_configs_with_the_reason() {
    let dir = tempfile_dir();
    let cases = [
        (
            "listen = \"127.0.0.1:1\"\nlisten_adress = 1\n[backend]\naddress = \"127.0.0.1:6379\"\n",
            "unknown field `listen_adress`",
        ),
        (
            "[backend]\naddress = \"127.0.0.1:6379\"\ncommand_timeout = \"soon\"\n",
            "command_timeout",
        ),
        (
            "max_bulk = \"lots\"\n[backend]\naddress = \"127.0.0.1:6379\"\n",
            "max_bulk",
        ),
        (
            "[backend]\n",
            "exactly one of --backend, --cluster, --shards or --sentinel",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let (ok, _, err) = respire(&["check", "--config", p.to_str().unwrap()]);
        assert!(!ok, "{text} was accepted");
        assert!(
            err.contains(want),
            "for {text:?} expected {want:?} in: {err}"
        );
    }
    let (ok, _, err) = respire(&["check", "--config", "/nonexistent/respire.toml"]);
    assert!(!ok && err.contains("cannot read"), "{err}");
}

#[test]
fn flags_override_the_file() {
    let dir = tempfile_dir();
    let p = dir.path().join("f.toml");
    std::fs::write(
        &p,
        "listen = \"not an address\"\n[backend]\naddress = \"127.0.0.1:6379\"\n",
    )
    .unwrap();
    let (ok, _, _) = respire(&["check", "--config", p.to_str().unwrap()]);
    assert!(!ok);
    let (ok, _, err) = respire(&[
        "check",
        "--config",
        p.to_str().unwrap(),
        "--listen",
        "127.0.0.1:7000",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = respire(&[
        "check",
        "--listen",
        "127.0.0.1:7000",
        "--backend",
        "127.0.0.1:6379",
        "--workers",
        "3",
    ]);
    assert!(ok, "{err}");
}

fn tempfile_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("respire-cli-")
        .tempdir()
        .unwrap()
}
