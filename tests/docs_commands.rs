//! The commands and snippets the docs show must work as written. This test reads them out of
//! README.md and docs/*.md at test time (so an edited doc is tested as edited), runs the
//! unattended ones against real servers on 127.0.0.1 port 0 (substituting the port and PID the
//! docs show), and fails on any command it neither runs nor lists with a reason for not running.
//! The `cargo run` commands (README.md's among them) run in `.ci/docs-commands` instead: cargo
//! holds its build lock while tests run.
//!
//! Needs `python3`, `ss`, `lsof` and `prlimit` on the PATH, like the docs do.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use closewait::stats::Counter;
use common::*;

/// Longest a single doc command may run.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
/// The port and PID the captures in docs/diagnose.md happen to show.
const DIAGNOSE_PORT: &str = "37757";
const DIAGNOSE_PID: &str = "18764";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read_doc(name: &str) -> String {
    std::fs::read_to_string(root().join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

/// A fenced code block: its info string (language) and its text.
struct Block {
    lang: String,
    text: String,
}

/// Every fenced block of a Markdown text, indented ones (inside list items) included.
fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<(String, usize, Vec<String>)> = None;
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match current.take() {
            None => {
                if let Some(lang) = trimmed.strip_prefix("```") {
                    current = Some((lang.trim().to_string(), indent, Vec::new()));
                }
            }
            Some((lang, indent, lines)) if trimmed == "```" => {
                let _ = indent;
                out.push(Block {
                    lang,
                    text: lines.join("\n") + "\n",
                });
            }
            Some((lang, indent, mut lines)) => {
                lines.push(line.get(indent..).unwrap_or(trimmed).to_string());
                current = Some((lang, indent, lines));
            }
        }
    }
    assert!(current.is_none(), "unclosed code block");
    out
}

/// The first block of `lang` after the heading line `heading`.
fn block_after(markdown: &str, heading: &str, lang: &str) -> String {
    let start = markdown
        .lines()
        .position(|l| l.trim() == heading)
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    let rest: Vec<&str> = markdown.lines().skip(start).collect();
    blocks(&rest.join("\n"))
        .into_iter()
        .find(|b| b.lang == lang)
        .unwrap_or_else(|| panic!("no {lang} block after {heading:?}"))
        .text
}

/// Every command a doc shows: each `$ ` line of its text blocks (the comment after `#`
/// dropped) and each `sh` block whole.
fn commands(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    for block in blocks(markdown) {
        match block.lang.as_str() {
            "sh" => out.push(block.text),
            "text" => out.extend(block.text.lines().filter_map(|l| {
                let cmd = l.strip_prefix("$ ")?;
                let cmd = match cmd.find("  #") {
                    Some(at) => &cmd[..at],
                    None => cmd,
                };
                Some(cmd.trim().to_string())
            })),
            _ => {}
        }
    }
    out
}

/// Output of a finished command.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Run `cmd` with a time limit, from the repository root, capturing its output.
fn run(mut cmd: Command, what: &str) -> Ran {
    let mut child = cmd
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let pipe = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + COMMAND_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} ran longer than {COMMAND_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ran {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn python(code: &str) -> Ran {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(code);
    run(cmd, &format!("python3 -c {code:?}"))
}

fn bash(script: &str, env: &[(&str, String)]) -> Ran {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(cmd, &format!("bash -c {script:?}"))
}

fn assert_ok(ran: &Ran, what: &str) {
    assert_eq!(
        ran.code,
        Some(0),
        "{what} failed\nstdout:\n{}\nstderr:\n{}",
        ran.stdout,
        ran.stderr
    );
}

/// A process started by a doc command line that keeps running (a server), killed on drop.
struct Started {
    child: Child,
    stderr: mpsc::Receiver<String>,
    port: u16,
}

impl Started {
    /// Run a doc line that starts a server (with `target/release/closewait` replaced by the
    /// binary under test and port 0 kept), wait for `listening on`.
    fn line(line: &str) -> Started {
        let line = line.replace("target/release/closewait", env!("CARGO_BIN_EXE_closewait"));
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(format!("exec {line}"))
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a doc server line");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (first_tx, first_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = first_tx.send(lines.next());
            for _ in lines {}
        });
        let first = match first_rx.recv_timeout(WAIT) {
            Ok(Some(Ok(line))) => line,
            other => panic!("{line}: no 'listening on' line: {other:?}"),
        };
        let port = first
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{line}: unexpected first line {first:?}"));
        Started {
            child,
            stderr: rx,
            port,
        }
    }

    /// SIGTERM, wait for exit 0, and return everything it logged.
    fn stop(mut self) -> Vec<String> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert_eq!(status.code(), Some(0), "server exit status");
                break;
            }
            assert!(Instant::now() < deadline, "server did not stop");
            thread::sleep(Duration::from_millis(10));
        }
        let mut log = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(1)) {
            log.push(line);
        }
        log
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks that every command of a doc was either run or deliberately not run.
struct Ledger {
    doc: &'static str,
    pending: BTreeSet<String>,
}

impl Ledger {
    fn new(doc: &'static str) -> Ledger {
        Ledger {
            doc,
            pending: commands(&read_doc(doc)).into_iter().collect(),
        }
    }

    /// The commands starting with `prefix` (at least one must exist), marked as handled.
    fn take(&mut self, prefix: &str) -> Vec<String> {
        let found: Vec<String> = self
            .pending
            .iter()
            .filter(|c| c.starts_with(prefix))
            .cloned()
            .collect();
        assert!(
            !found.is_empty(),
            "{}: no command starting with {prefix:?} (the doc changed: update this test)",
            self.doc
        );
        for c in &found {
            self.pending.remove(c);
        }
        found
    }

    /// Not run here, for the reason given (printed, so nothing is skipped silently).
    fn not_run(&mut self, prefix: &str, reason: &str) {
        for c in self.take(prefix) {
            eprintln!("{}: not run: {c:?}: {reason}", self.doc);
        }
    }

    fn finish(self) {
        assert!(
            self.pending.is_empty(),
            "{}: commands this test neither runs nor explains: {:#?}",
            self.doc,
            self.pending
        );
    }
}

#[test]
fn readme_talk_to_it_snippet_runs_against_a_live_server() {
    let server = Server::start(&[]);
    let snippet = block_after(&read_doc("README.md"), "## Talk to it", "python");
    assert!(
        snippet.contains("7878"),
        "the snippet names the default port"
    );
    let ran = python(&snippet.replace("7878", &server.addr.port().to_string()));
    assert_ok(&ran, "README snippet");
    let mut lines = ran.stdout.lines();
    assert_eq!(lines.next(), Some(r"b'\x81hello'"), "{}", ran.stdout);
    let stats: Vec<&str> = lines.collect();
    for expected in ["active 1", "accepted 1", "closed_eof 0"] {
        assert!(stats.contains(&expected), "{expected:?} in {stats:?}");
    }
}

#[test]
fn operations_stats_snippet_prints_every_counter() {
    let server = Server::start(&[]);
    let snippet = block_after(&read_doc("docs/operations.md"), "## STATS", "python");
    assert!(
        snippet.lines().count() <= 5,
        "the STATS snippet is promised to be 5 lines"
    );
    let ran = python(&snippet.replace("7878", &server.addr.port().to_string()));
    assert_ok(&ran, "STATS snippet");
    let names: Vec<&str> = ran
        .stdout
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let all: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(names, all, "{}", ran.stdout);
    assert!(
        ran.stdout.lines().any(|l| l == "active 1"),
        "{}",
        ran.stdout
    );
}

#[test]
fn template_snippet_talks_to_the_auth_example() {
    let auth = PathBuf::from(env!("CARGO_BIN_EXE_closewait"))
        .parent()
        .unwrap()
        .join("examples/auth");
    assert!(
        auth.exists(),
        "{} missing: run `cargo test` (it builds examples) or `cargo build --examples`",
        auth.display()
    );
    let server = Started::line(&format!(
        "{} --listen 127.0.0.1:0 --password hunter2",
        auth.display()
    ));
    let template = read_doc("docs/template.md");
    let snippet = block_after(&template, "### Your own counters", "python");
    let ran = python(&snippet.replace("7878", &server.port.to_string()));
    assert_ok(&ran, "template auth snippet");
    let shown = block_after(&template, "### Your own counters", "text");
    assert_eq!(ran.stdout.trim_end(), shown.trim_end());
}

#[test]
fn template_snippet_talks_to_the_pool_example() {
    let pool = PathBuf::from(env!("CARGO_BIN_EXE_closewait"))
        .parent()
        .unwrap()
        .join("examples/pool");
    assert!(
        pool.exists(),
        "{} missing: run `cargo test` (it builds examples) or `cargo build --examples`",
        pool.display()
    );
    let server = Started::line(&format!(
        "{} --listen 127.0.0.1:0 --threads 4",
        pool.display()
    ));
    let template = read_doc("docs/template.md");
    let heading = "### Slow work: deferred replies";
    let snippet = block_after(&template, heading, "python");
    let ran = python(&snippet.replace("7878", &server.port.to_string()));
    assert_ok(&ran, "template pool snippet");
    let shown = block_after(&template, heading, "text");
    assert_eq!(ran.stdout.trim_end(), shown.trim_end());
}

#[test]
fn template_snippet_talks_to_the_counter_example() {
    let counter = PathBuf::from(env!("CARGO_BIN_EXE_closewait"))
        .parent()
        .unwrap()
        .join("examples/counter");
    assert!(
        counter.exists(),
        "{} missing: run `cargo test` (it builds examples) or `cargo build --examples`",
        counter.display()
    );
    let server = Started::line(&format!("{} --listen 127.0.0.1:0", counter.display()));
    let snippet = block_after(&read_doc("docs/template.md"), "## 5. Try it", "python");
    let ran = python(&snippet.replace("7878", &server.port.to_string()));
    assert_ok(&ran, "template snippet");
    assert_eq!(
        ran.stdout.lines().collect::<Vec<_>>(),
        [
            r"b'\x90\x00\x00\x00\x00\x00\x00\x00\x01'",
            "2",
            "2",
            r"b'\xffunknown op 0x42'"
        ],
        "{}",
        ran.stdout
    );
    server.stop();
}

#[test]
fn diagnose_commands_run_against_a_leaky_server() {
    let mut ledger = Ledger::new("docs/diagnose.md");
    let start = ledger.take("cargo build --release");
    assert!(
        start[0].contains("target/release/closewait --leaky --listen 127.0.0.1:0"),
        "{start:?}"
    );
    eprintln!(
        "docs/diagnose.md: not run: {start:?}: no cargo inside cargo test; the same server \
         is started below from the binary under test"
    );
    ledger.not_run(
        "PID=",
        "the test sets PID and PORT itself, to the server it started",
    );
    ledger.not_run(
        "cargo run --release -p loadtest -- watch",
        "no cargo inside cargo test; .ci/docs-commands runs it as written against a live server",
    );
    ledger.not_run(
        "cargo run --release -p loadtest -- probe",
        "no cargo inside cargo test; .ci/docs-commands runs it as written against a leaky \
         server, and loadtest/tests/probe.rs runs the probe against four servers",
    );
    let server = Server::start(&["--leaky"]);
    let baseline = server.fds();
    let (pid, port) = (server.pid().to_string(), server.addr.port().to_string());
    let env = [("PID", pid.clone()), ("PORT", port.clone())];
    let localize = |c: &str| {
        c.replace(DIAGNOSE_PORT, &port)
            .replace(DIAGNOSE_PID, &pid)
            .replace("$(seq 10)", "$(seq 2)")
    };
    // In the order the doc shows them, as a reader would type them.
    for command in commands(&read_doc("docs/diagnose.md")) {
        if !ledger.pending.remove(&command) {
            continue;
        }
        let ran = bash(&localize(&command), &env);
        // `grep -c` finding nothing prints 0 and exits 1: the command still works.
        let no_match = ran.code == Some(1) && ran.stdout.trim() == "0";
        if !no_match {
            assert_ok(&ran, &command);
        }
        // Section 5: the five peers reset after their FIN left CLOSE_WAIT, fds still held.
        if command == "lsof -p $PID | grep -c 'protocol: TCP'" {
            assert_eq!(ran.stdout.trim(), "5", "{}", ran.stdout);
        }
        if command.starts_with("lsof -p $PID -a -i TCP") {
            assert_eq!(
                ran.stdout.matches("(CLOSE_WAIT)").count(),
                5,
                "{}",
                ran.stdout
            );
        }
    }
    ledger.finish();
    // The doc's `peers.py $PORT 5` ran exactly once: five leaked sockets in CLOSE_WAIT, as
    // shown; `fin-then-rst.py $PORT 5` leaked five more that no TCP table lists.
    assert_eq!(server.close_wait(), 5);
    assert_eq!(server.fds(), baseline + 10, "ten leaked fds");
}

#[test]
fn fd_budget_commands_show_what_the_doc_says() {
    let mut ledger = Ledger::new("docs/fd-budget.md");
    // Start-up lines: run each with the binary under test, check the log line the doc quotes.
    let raised = ledger.take("prlimit --nofile=1024:4096 target/release/closewait");
    let log = Started::line(&raised[0]).stop();
    assert!(
        log.iter()
            .any(|l| l.contains("fd limit: soft 4096 (was 1024), hard 4096")),
        "{log:#?}"
    );
    let clamped = ledger.take("prlimit --nofile=128:128 target/release/closewait");
    let log = Started::line(&clamped[0]).stop();
    assert!(
        log.iter()
            .any(|l| l.contains("--max-connections 100000 is more than the fd limit allows")),
        "{log:#?}"
    );
    let too_low = ledger.take("prlimit --nofile=30:30 target/release/closewait");
    let ran = bash(
        &too_low[0].replace("target/release/closewait", env!("CARGO_BIN_EXE_closewait")),
        &[],
    );
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("leaves no room for connections"),
        "{}",
        ran.stderr
    );
    // The backpressure capture: the server line, then the script against it.
    let line = ledger.take("target/release/closewait --listen 127.0.0.1:0 --max-connections 2");
    let server = Started::line(&line[0]);
    let script = ledger.take("python3 docs/scripts/at-cap.py");
    let ran = bash(&script[0].replace("40639", &server.port.to_string()), &[]);
    assert_ok(&ran, &script[0]);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(
        lines[0], "['served', 'served', 'waiting', 'waiting', 'waiting']",
        "{}",
        ran.stdout
    );
    assert!(lines[2].starts_with("LISTEN 3 "), "{}", ran.stdout);
    assert_eq!(
        lines[3], "['served', 'waiting', 'waiting']",
        "{}",
        ran.stdout
    );
    assert!(
        lines[4].starts_with("active 2 accepted 3 accept_pauses "),
        "{}",
        ran.stdout
    );
    let log = server.stop();
    assert!(
        log.iter()
            .any(|l| l.contains("connection cap reached (2 open)")),
        "{log:#?}"
    );
    // The limits block: against this test's own process.
    let env = [("PID", std::process::id().to_string())];
    for block in ledger.take("ulimit -Sn") {
        let ran = bash(&block, &env);
        assert_ok(&ran, &block);
        assert!(ran.stdout.contains("Max open files"), "{}", ran.stdout);
    }
    ledger.finish();
}

#[test]
fn scripts_behave_as_the_docs_describe() {
    let server = Server::start(&[]);
    let baseline = server.fds();
    let port = server.addr.port().to_string();
    let ran = bash(&format!("python3 docs/scripts/peers.py {port} 20"), &[]);
    assert_ok(&ran, "peers.py");
    assert_eq!(ran.stdout.trim(), "20 peers connected, pinged and closed");
    server.wait_for_fds(baseline);
    let ran = bash(&format!("python3 docs/scripts/hold.py {port}"), &[]);
    assert_ok(&ran, "hold.py");
    assert_eq!(
        ran.stdout.trim(),
        "held 75 connections for 7 s, closing them"
    );
    server.wait_for_fds(baseline);
}

/// Every Rust block of docs/template.md is code that compiles and runs: an excerpt, verbatim
/// (indentation aside), of a file that is built and tested, and the test file it shows whole
/// is that file.
#[test]
fn template_rust_blocks_are_the_code_they_quote() {
    let sources: Vec<(&str, String)> = [
        "examples/counter.rs",
        "examples/auth.rs",
        "examples/pool.rs",
        "examples/resp.rs",
        "tests/example_counter.rs",
        "src/service.rs",
        "src/codec.rs",
    ]
    .into_iter()
    .map(|path| (path, read_doc(path)))
    .collect();
    let template = read_doc("docs/template.md");
    let rust: Vec<String> = blocks(&template)
        .into_iter()
        .filter(|b| b.lang == "rust")
        .map(|b| b.text)
        .collect();
    assert!(rust.len() >= 8, "only {} rust blocks", rust.len());
    for block in &rust {
        let found = sources.iter().any(|(_, text)| {
            (0..=8).step_by(4).any(|indent| {
                let pad = " ".repeat(indent);
                let shifted: String = block
                    .lines()
                    .map(|l| match l.is_empty() {
                        true => "\n".to_string(),
                        false => format!("{pad}{l}\n"),
                    })
                    .collect();
                text.contains(&shifted)
            })
        });
        assert!(
            found,
            "docs/template.md shows code found in none of {:?}:\n{block}",
            sources.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
    }
    let whole = read_doc("tests/example_counter.rs");
    assert!(
        rust.contains(&whole),
        "docs/template.md must show tests/example_counter.rs whole, as it is"
    );
}

/// The scrape docs/operations.md shows: the same commands against a live server give the same
/// series, in the same order, and the same counts for the nine peers.
#[test]
fn operations_scrape_shows_what_a_live_server_exports() {
    let doc = read_doc("docs/operations.md");
    let shown = blocks(&doc)
        .into_iter()
        .find(|b| b.lang == "text" && b.text.contains("$ curl -s http://127.0.0.1:9464/metrics"))
        .expect("the scrape block in docs/operations.md")
        .text;
    let mut lines = shown.lines();
    assert_eq!(
        lines.next(),
        Some("$ closewait --listen 127.0.0.1:7878 --metrics 127.0.0.1:9464 &")
    );
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    assert_eq!(
        (lines.next(), lines.next()),
        (
            Some("listening on 127.0.0.1:7878"),
            Some("metrics on 127.0.0.1:9464")
        )
    );
    let port = server.addr.port().to_string();
    let metrics_port = server.metrics.unwrap().port().to_string();
    let peers = lines.next().unwrap().strip_prefix("$ ").unwrap();
    let ran = bash(&peers.replace("7878", &port), &[]);
    assert_ok(&ran, peers);
    assert_eq!(Some(ran.stdout.trim_end()), lines.next());
    let curl = lines.next().unwrap().strip_prefix("$ ").unwrap();
    let ran = bash(&curl.replace("9464", &metrics_port), &[]);
    assert_ok(&ran, curl);

    let series = |text: &str| -> Vec<(String, String)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("$ "))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    };
    let doc_series = series(&lines.collect::<Vec<_>>().join("\n"));
    let live = series(&ran.stdout);
    let names = |s: &[(String, String)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&live), names(&doc_series), "{}", ran.stdout);
    for name in [
        "closewait_active",
        "closewait_accepted_total",
        "closewait_closed_eof_total",
        "closewait_requests_total",
        "closewait_fin_to_close_seconds_count",
        "closewait_close_wait_sockets",
    ] {
        let value = |s: &[(String, String)]| s.iter().find(|(n, _)| n == name).unwrap().1.clone();
        assert_eq!(value(&live), value(&doc_series), "{name}");
    }
    assert_eq!(
        shown.matches("\n# TYPE").count(),
        ran.stdout.matches("# TYPE").count()
    );
}

#[test]
fn operations_alert_rule_commands_pass() {
    let rules = block_after(&read_doc("docs/operations.md"), "## What to alert on", "sh");
    let ran = bash(&rules, &[]);
    assert_ok(&ran, &rules);
}

#[test]
fn commands_that_need_a_machine_of_their_own_are_listed_not_run() {
    // These install files, start services or bind fixed ports; they were run by hand on
    // the development VM as docs/operations.md and docs/template.md say.
    let mut ops = Ledger::new("docs/operations.md");
    ops.not_run(
        "cargo build --release\ninstall",
        "installs into /usr/local and /etc/systemd; checked with systemd-analyze verify",
    );
    ops.not_run(
        "target/release/closewait --listen 127.0.0.1:7881",
        "fixed ports 7878 and 7881-7883 and HAProxy; run by hand as the doc describes",
    );
    // Run by operations_scrape_shows_what_a_live_server_exports (on ports the OS picks) and
    // operations_alert_rule_commands_pass.
    for prefix in [
        "closewait --listen 127.0.0.1:7878 --metrics",
        "python3 docs/scripts/peers.py 7878 9",
        "curl -s http://127.0.0.1:9464/metrics",
        "promtool check rules",
    ] {
        ops.take(prefix);
    }
    ops.finish();
    let mut template = Ledger::new("docs/template.md");
    template.not_run(
        "cargo run --release --example counter",
        "no cargo inside cargo test; .ci/docs-commands runs it as written, and the example \
         binary is run by template_snippet_talks_to_the_counter_example",
    );
    template.not_run(
        "cargo run --release --example resp",
        "no cargo inside cargo test; .ci/docs-commands runs it as written",
    );
    template.not_run(
        "cargo run --release --example auth",
        "no cargo inside cargo test; .ci/docs-commands runs it as written, and the example \
         binary is run by template_snippet_talks_to_the_auth_example",
    );
    template.not_run(
        "cargo run --release --example pool",
        "no cargo inside cargo test; .ci/docs-commands runs it as written, and the example \
         binary is run by template_snippet_talks_to_the_pool_example",
    );
    template.not_run(
        "redis-cli -p 7878 SET greeting hello",
        ".ci/docs-commands runs them against the resp example as written; \
         tests/example_resp.rs runs the same clients in-process",
    );
    template.finish();
    let mut stacks = Ledger::new("docs/other-stacks/README.md");
    stacks.not_run(
        "cargo run --release -p loadtest -- probe",
        "no cargo inside cargo test; .ci/docs-commands runs it as written against both Python \
         servers, and loadtest/tests/probe.rs checks the counts the doc shows",
    );
    stacks.not_run(
        "python3 docs/other-stacks/python/",
        "servers that run until stopped; .ci/docs-commands and loadtest/tests/probe.rs start them",
    );
    stacks.finish();
    Ledger::new("docs/architecture.md").finish();
}

/// close-wait.md's RST-rule table, re-run as the doc shows it: closing at once resets every
/// trial; lingering delivers every one.
#[test]
fn the_rst_rule_script_shows_what_the_close_wait_doc_says() {
    let mut ledger = Ledger::new("docs/close-wait.md");
    let command = ledger.take("python3 docs/scripts/rst-on-close.py PORT 100");
    ledger.finish();
    for (flags, expected) in [
        (
            &["--linger-timeout", "0"][..],
            "100 trials: 0 got the whole echo reply, the ERROR frame and EOF; 100 ended in \
             ECONNRESET",
        ),
        (
            &[][..],
            "100 trials: 100 got the whole echo reply, the ERROR frame and EOF; 0 ended in \
             ECONNRESET",
        ),
    ] {
        let server = Server::start(flags);
        let ran = bash(
            &command[0].replace("PORT", &server.addr.port().to_string()),
            &[],
        );
        assert_ok(&ran, &command[0]);
        assert!(
            ran.stdout.starts_with(expected),
            "{flags:?}: {}",
            ran.stdout
        );
        assert!(
            ran.stdout.contains("TcpExtTCPAbortOnClose +"),
            "{}",
            ran.stdout
        );
    }
}
