//! Model-based test of DeltaFS: random file operations interleaved with checkpoint, rollback to a random
//! earlier checkpoint and fork, run inside a real sandbox; after every step the sandbox's tree equals a plain
//! in-memory reference model. `DELTABOX_MODEL_STEPS` (default 2000) and `DELTABOX_MODEL_SEED` scale it up.

use std::collections::BTreeMap;

use crate::common::*;

/// Runs in the sandbox's python session: an op interpreter and a canonical listing of /work.
const PRELUDE: &str = r#"
import os, stat, json
def op(kind, a, b=None, c=None):
    p = '/work/' + a
    if kind == 'create':
        open(p, 'wb').write(bytes.fromhex(b))
    elif kind == 'write':
        with open(p, 'r+b') as f:
            f.seek(c); f.write(bytes.fromhex(b))
    elif kind == 'truncate':
        os.truncate(p, b)
    elif kind == 'rename':
        os.rename(p, '/work/' + b)
    elif kind == 'unlink':
        os.unlink(p)
    elif kind == 'mkdir':
        os.mkdir(p)
    elif kind == 'rmdir':
        os.rmdir(p)
    elif kind == 'symlink':
        os.symlink(b, p)
    elif kind == 'link':
        os.link(p, '/work/' + b)
    elif kind == 'chmod':
        os.chmod(p, b)
    elif kind == 'setxattr':
        os.setxattr(p, 'user.' + b, bytes.fromhex(c))
def listing():
    rows, inodes = [], {}
    for root, dirs, files in os.walk('/work'):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(root, name); rel = p[len('/work/'):]
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                rows.append([rel, 'l', os.readlink(p)])
            elif stat.S_ISDIR(st.st_mode):
                rows.append([rel, 'd', st.st_mode & 0o7777])
            else:
                inodes.setdefault(st.st_ino, []).append(rel)
                xs = sorted([k, os.getxattr(p, k).hex()] for k in os.listxattr(p) if k.startswith('user.k'))
                rows.append([rel, 'f', st.st_mode & 0o7777, open(p, 'rb').read().hex(), st.st_ino, xs])
    for r in rows:
        if r[1] == 'f':
            r[4] = min(inodes[r[4]])
    return json.dumps(sorted(rows))
os.makedirs('/work', exist_ok=True)
"#;

#[derive(Clone, Debug)]
enum Node {
    Dir(u32),
    File(usize),
    Link(String),
}

#[derive(Clone, Debug, Default)]
struct Inode {
    data: Vec<u8>,
    mode: u32,
    xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    tree: BTreeMap<String, Node>,
    inodes: Vec<Inode>,
}

impl Model {
    fn nlink(&self, ino: usize) -> usize {
        self.tree
            .values()
            .filter(|n| matches!(n, Node::File(i) if *i == ino))
            .count()
    }

    fn listing(&self) -> serde_json::Value {
        let mut rows = Vec::new();
        for (p, n) in &self.tree {
            rows.push(match n {
                Node::Dir(m) => serde_json::json!([p, "d", m]),
                Node::Link(t) => serde_json::json!([p, "l", t]),
                Node::File(i) => {
                    let ino = &self.inodes[*i];
                    let rep = self
                        .tree
                        .iter()
                        .find(|(_, n)| matches!(n, Node::File(j) if j == i))
                        .map(|(p, _)| p.clone())
                        .unwrap();
                    let xs: Vec<_> = ino
                        .xattrs
                        .iter()
                        .map(|(k, v)| serde_json::json!([format!("user.{k}"), hex(v)]))
                        .collect();
                    serde_json::json!([p, "f", ino.mode, hex(&ino.data), rep, xs])
                }
            });
        }
        rows.sort_by_key(|r| r.to_string());
        serde_json::Value::Array(rows)
    }

    fn parent_is_dir(&self, p: &str) -> bool {
        match p.rsplit_once('/') {
            None => true,
            Some((parent, _)) => matches!(self.tree.get(parent), Some(Node::Dir(_))),
        }
    }

    fn is_empty_dir(&self, p: &str) -> bool {
        let prefix = format!("{p}/");
        matches!(self.tree.get(p), Some(Node::Dir(_)))
            && !self.tree.keys().any(|k| k.starts_with(&prefix))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn random_path(rng: &mut Rng) -> String {
    let names = ["a", "b", "c", "d", "e"];
    let depth = 1 + rng.below(3);
    (0..depth)
        .map(|_| names[rng.below(names.len())])
        .collect::<Vec<_>>()
        .join("/")
}

/// Picks an operation that must succeed according to the model, applies it to the model, and returns the
/// python call that performs it in the sandbox.
fn random_op(m: &mut Model, rng: &mut Rng) -> Option<String> {
    // Half the time an existing entry (or a new name inside an existing directory), so that most steps act.
    let pick = |m: &Model, rng: &mut Rng| -> String {
        let keys: Vec<&String> = m.tree.keys().collect();
        match rng.below(4) {
            0 | 1 if !keys.is_empty() => keys[rng.below(keys.len())].clone(),
            2 => {
                let dirs: Vec<&String> = m
                    .tree
                    .iter()
                    .filter(|(_, n)| matches!(n, Node::Dir(_)))
                    .map(|(k, _)| k)
                    .collect();
                let name = ["a", "b", "c", "d", "e"][rng.below(5)];
                if dirs.is_empty() {
                    name.to_string()
                } else {
                    format!("{}/{name}", dirs[rng.below(dirs.len())])
                }
            }
            _ => random_path(rng),
        }
    };
    let p = pick(m, rng);
    let q = pick(m, rng);
    let node = m.tree.get(&p).cloned();
    match rng.below(12) {
        0 | 1 if node.is_none() && m.parent_is_dir(&p) => {
            let data = rng.bytes(64);
            m.inodes.push(Inode {
                data: data.clone(),
                mode: 0o644,
                xattrs: BTreeMap::new(),
            });
            m.tree.insert(p.clone(), Node::File(m.inodes.len() - 1));
            Some(format!("op('create', '{p}', '{}')", hex(&data)))
        }
        // Writing through one name of a hard-linked file is left out: see the README (overlayfs without
        // `index=on` breaks hard links on copy-up).
        2 | 3 => match node {
            Some(Node::File(i)) if m.nlink(i) == 1 => {
                let data = rng.bytes(32);
                let off = rng.below(m.inodes[i].data.len() + 8);
                let ino = &mut m.inodes[i];
                // A zero-length write changes nothing, not even past the end.
                if !data.is_empty() && ino.data.len() < off + data.len() {
                    ino.data.resize(off + data.len(), 0);
                }
                if !data.is_empty() {
                    ino.data[off..off + data.len()].copy_from_slice(&data);
                }
                Some(format!("op('write', '{p}', '{}', {off})", hex(&data)))
            }
            _ => None,
        },
        4 => match node {
            Some(Node::File(i)) if m.nlink(i) == 1 => {
                let len = rng.below(80);
                m.inodes[i].data.resize(len, 0);
                Some(format!("op('truncate', '{p}', {len})"))
            }
            _ => None,
        },
        5 => {
            // Files, symlinks and (empty or not) directories; the target must not exist or be a file over a file.
            let src = node?;
            // Renaming one name of a hard-linked file copies it up and (overlayfs without `index=on`) breaks the
            // link: a documented limitation, left out here like writes through such a name.
            if matches!(src, Node::File(i) if m.nlink(i) > 1)
                || matches!(m.tree.get(&q), Some(Node::File(i)) if m.nlink(*i) > 1)
            {
                return None;
            }
            let over_file = matches!((&src, m.tree.get(&q)), (Node::File(_), Some(Node::File(_))));
            if p == q
                || q.starts_with(&format!("{p}/"))
                || !m.parent_is_dir(&q)
                || (m.tree.contains_key(&q) && !over_file)
            {
                return None;
            }
            let moved: Vec<(String, Node)> = m
                .tree
                .iter()
                .filter(|(k, _)| **k == p || k.starts_with(&format!("{p}/")))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (k, _) in &moved {
                m.tree.remove(k);
            }
            for (k, v) in moved {
                m.tree.insert(format!("{q}{}", &k[p.len()..]), v);
            }
            Some(format!("op('rename', '{p}', '{q}')"))
        }
        6 => match node {
            Some(Node::File(_) | Node::Link(_)) => {
                m.tree.remove(&p);
                Some(format!("op('unlink', '{p}')"))
            }
            _ => None,
        },
        7 if node.is_none() && m.parent_is_dir(&p) => {
            m.tree.insert(p.clone(), Node::Dir(0o755));
            Some(format!("op('mkdir', '{p}')"))
        }
        8 if m.is_empty_dir(&p) => {
            m.tree.remove(&p);
            Some(format!("op('rmdir', '{p}')"))
        }
        9 if node.is_none() && m.parent_is_dir(&p) => {
            let target = format!("../{}", random_path(rng));
            m.tree.insert(p.clone(), Node::Link(target.clone()));
            Some(format!("op('symlink', '{p}', '{target}')"))
        }
        10 => match node {
            // Linking to an already hard-linked name copies that name up: same limitation as above.
            Some(Node::File(i))
                if m.nlink(i) == 1 && !m.tree.contains_key(&q) && m.parent_is_dir(&q) =>
            {
                m.tree.insert(q.clone(), Node::File(i));
                Some(format!("op('link', '{p}', '{q}')"))
            }
            _ => None,
        },
        11 => match node {
            Some(Node::File(i)) if m.nlink(i) == 1 => {
                if rng.below(2) == 0 {
                    let mode = [0o600, 0o644, 0o755, 0o400][rng.below(4)];
                    m.inodes[i].mode = mode;
                    Some(format!("op('chmod', '{p}', {mode})"))
                } else {
                    let k = format!("k{}", rng.below(3));
                    let v = rng.bytes(16);
                    m.inodes[i].xattrs.insert(k.clone(), v.clone());
                    Some(format!("op('setxattr', '{p}', '{k}', '{}')", hex(&v)))
                }
            }
            Some(Node::Dir(_)) if rng.below(4) == 0 => {
                let mode = [0o700, 0o755, 0o711][rng.below(3)];
                m.tree.insert(p.clone(), Node::Dir(mode));
                Some(format!("op('chmod', '{p}', {mode})"))
            }
            _ => None,
        },
        _ => None,
    }
}

fn start_py(d: &TestDaemon, id: &str) -> String {
    let s = d
        .ok(&["session", "start", id, "python3"])
        .trim()
        .to_string();
    let r = d.json(&["session", "run", id, &s, PRELUDE]);
    assert_eq!(r["exit_code"], 0, "{r}");
    s
}

fn sandbox_listing(d: &TestDaemon, id: &str, s: &str) -> serde_json::Value {
    let r = d.json(&["session", "run", id, s, "print(listing())"]);
    assert_eq!(r["exit_code"], 0, "{r}");
    let mut v: serde_json::Value = serde_json::from_str(r["stdout"].as_str().unwrap()).unwrap();
    let rows = v.as_array_mut().unwrap();
    rows.sort_by_key(|r| r.to_string());
    v
}

/// Fails with the entries that differ, not two whole trees.
fn assert_same(got: &serde_json::Value, want: &serde_json::Value, what: &str) {
    if got == want {
        return;
    }
    let g: Vec<String> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.to_string())
        .collect();
    let w: Vec<String> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.to_string())
        .collect();
    let only_got: Vec<_> = g.iter().filter(|r| !w.contains(r)).collect();
    let only_want: Vec<_> = w.iter().filter(|r| !g.contains(r)).collect();
    panic!("{what}: tree differs from the model\n  sandbox only: {only_got:?}\n  model only:   {only_want:?}");
}

#[test]
fn random_operations_checkpoints_rollbacks_and_forks_match_the_model() {
    let steps: usize = std::env::var("DELTABOX_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("DELTABOX_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd);
    // Compaction at its most aggressive (merge pairs as soon as a chain has 4 layers), concurrently with
    // everything else: every rollback and fork below then goes through merged layers, merges of merged layers,
    // and chains rewritten while the sandbox runs.
    let d = TestDaemon::start_with(&[
        ("DELTABOX_COMPACT_AT", "4"),
        ("DELTABOX_COMPACT_FANOUT", "2"),
    ]);
    let id = d.create(&[]);
    let mut s = start_py(&d, &id);
    let mut rng = Rng(seed);
    let mut model = Model::default();
    let mut checkpoints: Vec<(String, Model)> = Vec::new();
    let (mut ops, mut cks, mut rbs, mut forks) = (0, 0, 0, 0);
    let mut last = String::new();
    for step in 0..steps {
        let roll = rng.below(100);
        if roll < 5 {
            let c = d.ok(&["checkpoint", &id]).trim().to_string();
            last = format!("checkpoint {c}");
            checkpoints.push((c, model.clone()));
            cks += 1;
        } else if roll < 8 && !checkpoints.is_empty() {
            let (c, snap) = checkpoints[rng.below(checkpoints.len())].clone();
            d.ok(&["rollback", &id, &c]);
            last = format!("rollback {c}");
            model = snap;
            s = start_py(&d, &id);
            rbs += 1;
        } else if roll < 9 && !checkpoints.is_empty() {
            let (c, snap) = checkpoints[rng.below(checkpoints.len())].clone();
            let fork = d.ok(&["fork", &c]).trim().to_string();
            let fs = start_py(&d, &fork);
            assert_eq!(
                sandbox_listing(&d, &fork, &fs),
                snap.listing(),
                "step {step}: fork of {c} differs from the model (seed {seed})"
            );
            d.ok(&["rm", &fork]);
            forks += 1;
        } else {
            let Some(call) = random_op(&mut model, &mut rng) else {
                continue;
            };
            last = call.clone();
            let r = d.json(&["session", "run", &id, &s, &call]);
            assert_eq!(
                r["exit_code"], 0,
                "step {step}: {call} failed in the sandbox (seed {seed}): {}",
                r["stderr"]
            );
            ops += 1;
        }
        assert_same(
            &sandbox_listing(&d, &id, &s),
            &model.listing(),
            &format!("step {step} (seed {seed}), last: {last}"),
        );
    }
    eprintln!("model test: {steps} steps: {ops} file operations, {cks} checkpoints, {rbs} rollbacks, {forks} forks");
    assert!(cks > 0 && rbs > 0 && forks > 0);
    let listed = d.json(&["checkpoints", &id, "--json"]);
    let compacted = listed
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["layers"].as_u64() < c["depth"].as_u64())
        .count();
    eprintln!("model test: {compacted} checkpoints on compacted chains");
    if steps >= 500 {
        assert!(compacted > 0, "no checkpoint chain was ever compacted");
    }
    d.stop_and_check(&[id]);
}
