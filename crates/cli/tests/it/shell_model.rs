//! Model-based test of process checkpoints: random shell-session commands (set and unset variables, cd, write
//! and delete files, start and stop background jobs) interleaved with `checkpoint --processes`, rollback to a
//! random earlier checkpoint and fork, compared after every step with a plain model of the expected shell and
//! file state. `DELTABOX_SHELL_MODEL_STEPS` / `_SEED` run more or other sequences.

use std::collections::BTreeMap;

use crate::common::*;

#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    vars: BTreeMap<usize, String>,
    cwd: String,
    files: BTreeMap<usize, String>,
    /// Background jobs running (each a `sleep` with a unique duration).
    jobs: Vec<usize>,
}

impl Model {
    fn fresh() -> Model {
        Model {
            cwd: "/root".into(),
            ..Default::default()
        }
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

const VARS: usize = 4;
const FILES: usize = 5;
const DIRS: [&str; 3] = ["/work", "/work/a", "/work/a/b"];

/// What the sandbox shows: variables and cwd from the session, files and live jobs from outside it.
fn observe(d: &TestDaemon, id: &str, s: &str) -> (String, String, String) {
    let vars: Vec<String> = (0..VARS).map(|i| format!("${{V{i}-unset}}")).collect();
    let shell = out(d, id, s, &format!("echo \"{}|$PWD\"", vars.join("|")));
    let (_, files, _) = d.sh(
        id,
        "cd /work/files 2>/dev/null && for f in $(ls | sort -n); do echo \"$f=$(cat $f)\"; done; true",
    );
    // Live jobs: state S (templates of them are stopped, state t).
    let (_, jobs, _) = d.sh(
        id,
        "for p in $(pgrep -f '^sleep 1[0-9]{4}$'); do s=$(awk '{print $3}' /proc/$p/stat 2>/dev/null); [ \"$s\" = S ] && tr '\\0' ' ' < /proc/$p/cmdline && echo; done | sort",
    );
    (shell, files, jobs)
}

fn expected(m: &Model) -> (String, String, String) {
    let vars: Vec<String> = (0..VARS)
        .map(|i| m.vars.get(&i).cloned().unwrap_or_else(|| "unset".into()))
        .collect();
    let shell = format!("{}|{}\n", vars.join("|"), m.cwd);
    let files: String = m.files.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let mut jobs: Vec<String> = m.jobs.iter().map(|j| format!("sleep {j} \n")).collect();
    jobs.sort();
    (shell, files, jobs.concat())
}

#[test]
fn random_session_commands_checkpoints_rollbacks_and_forks_match_the_model() {
    let steps: usize = std::env::var("DELTABOX_SHELL_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(250);
    let seed: u64 = std::env::var("DELTABOX_SHELL_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_5e11);
    // A small template pool, so that rollbacks also meet evicted checkpoints (files back, fresh shell).
    let d = TestDaemon::start_with(&[("DELTABOX_MAX_TEMPLATES", "12")]);
    let id = d.create(&[]);
    let mut s = d.session(&id, "bash");
    out(&d, &id, &s, "mkdir -p /work/a/b /work/files");
    let mut rng = Rng(seed);
    let mut m = Model::fresh();
    // (checkpoint, model, the session then)
    let mut cks: Vec<(String, Model, String)> = Vec::new();
    let mut next_job = 10_000;
    let (mut rbs, mut restarts, mut forks, mut live_forks) = (0, 0, 0, 0);
    for step in 0..steps {
        let what = match rng.below(100) {
            0..=14 => {
                let (i, v) = (rng.below(VARS), rng.below(1000));
                out(&d, &id, &s, &format!("export V{i}=v{v}"));
                m.vars.insert(i, format!("v{v}"));
                format!("set V{i}")
            }
            15..=21 => {
                let i = rng.below(VARS);
                out(&d, &id, &s, &format!("unset V{i}"));
                m.vars.remove(&i);
                format!("unset V{i}")
            }
            22..=31 => {
                let dir = DIRS[rng.below(DIRS.len())];
                out(&d, &id, &s, &format!("cd {dir}"));
                m.cwd = dir.into();
                format!("cd {dir}")
            }
            32..=46 => {
                let (f, v) = (rng.below(FILES), rng.below(1000));
                out(&d, &id, &s, &format!("echo c{v} > /work/files/{f}"));
                m.files.insert(f, format!("c{v}"));
                format!("write {f}")
            }
            47..=52 => {
                let f = rng.below(FILES);
                out(&d, &id, &s, &format!("rm -f /work/files/{f}"));
                m.files.remove(&f);
                format!("rm {f}")
            }
            53..=60 if m.jobs.len() < 3 => {
                next_job += 1;
                out(&d, &id, &s, &format!("sleep {next_job} &"));
                m.jobs.push(next_job);
                format!("start job {next_job}")
            }
            61..=66 if !m.jobs.is_empty() => {
                let j = m.jobs.remove(rng.below(m.jobs.len()));
                // By pid (not %n): after a rollback the job is no longer the shell's child.
                out(&d, &id, &s, &format!("pkill -x -f 'sleep {j}'; true"));
                format!("stop job {j}")
            }
            67..=78 => {
                let c = d.json(&["checkpoint", &id, "--processes", "--json"]);
                let c = c["id"].as_str().unwrap().to_string();
                cks.push((c.clone(), m.clone(), s.clone()));
                format!("checkpoint {c}")
            }
            79..=92 if !cks.is_empty() => {
                let (c, snap, then) = cks[rng.below(cks.len())].clone();
                let r = d.json(&["rollback", &id, &c, "--json"]);
                rbs += 1;
                m = snap;
                // The session that existed then comes back with its interpreter (even if a later rollback had
                // ended it); one started since is gone.
                s = then;
                if r["processes_restarted"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("step {step}: rollback to {c}: {r}"))
                {
                    // Its templates were evicted: files come back, the shell starts fresh.
                    restarts += 1;
                    s = d.session(&id, "bash");
                    m.vars.clear();
                    m.cwd = "/root".into();
                    m.jobs.clear();
                }
                format!("rollback {c} ({})", r["note"])
            }
            93..=99 if !cks.is_empty() => {
                // A fork gets the checkpoint's processes: the session goes on there from the checkpoint's
                // state, under the same id (with only the files if its templates were evicted).
                let (c, snap, then) = cks[rng.below(cks.len())].clone();
                let v = d.json(&["fork", &c]);
                let f = v[0]["id"].as_str().unwrap().to_string();
                let with_processes = v[0]["forked_processes"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty());
                let (fs, want) = if with_processes {
                    live_forks += 1;
                    (then, snap)
                } else {
                    let mut fresh = Model::fresh();
                    fresh.files = snap.files.clone();
                    (d.session(&f, "bash"), fresh)
                };
                assert_eq!(
                    observe(&d, &f, &fs),
                    expected(&want),
                    "step {step}: fork of {c} (seed {seed})"
                );
                // What the branch does stays in the branch (checked on the source below).
                out(&d, &f, &fs, "export V0=forked; cd /; rm -rf /work/files");
                d.ok(&["rm", &f]);
                forks += 1;
                format!("fork {c}")
            }
            _ => continue,
        };
        eprintln!("step {step}: {what}");
        assert_eq!(
            observe(&d, &id, &s),
            expected(&m),
            "step {step} (seed {seed}) after {what}"
        );
    }
    eprintln!(
        "shell model: {steps} steps, {} checkpoints, {rbs} rollbacks ({restarts} restarted), {forks} forks ({live_forks} with processes)",
        cks.len()
    );
    assert!(!cks.is_empty() && rbs > 0);
    assert!(forks == 0 || live_forks > 0, "no fork got the processes");
    d.stop_and_check(&[id]);
}
