//! Compaction against the kernel: random file operations over many overlay generations build real layers; a
//! merged layer must then show the same tree as the run it replaces, and the next generation must behave the
//! same on top of it (same results for the same operations, same tree after). Needs root (mounts overlays).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use deltabox_fs::compact::merge_layers;
use deltabox_fs::overlay::fsmount_readonly;
use deltabox_fs::LayerStack;

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
}

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

fn random_path(rng: &mut Rng) -> String {
    let depth = 1 + rng.below(3);
    (0..depth)
        .map(|_| NAMES[rng.below(NAMES.len())])
        .collect::<Vec<_>>()
        .join("/")
}

/// One random operation on the tree under `root`; returns what happened (errno or ok) so that two runs can be
/// compared.
fn random_op(rng: &mut Rng, root: &Path) -> String {
    let p = root.join(random_path(rng));
    let q = root.join(random_path(rng));
    let op = rng.below(12);
    let r: std::io::Result<()> = match op {
        0 | 1 => std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&p)
            .and_then(|f| {
                use std::os::unix::fs::FileExt;
                let data = format!("data{}", rng.next() % 1000).repeat(1 + rng.below(50));
                f.write_all_at(data.as_bytes(), rng.below(3000) as u64)
            }),
        2 => std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(rng.below(200) as u64)),
        3 | 4 => std::fs::create_dir(&p),
        5 => std::fs::remove_dir(&p),
        6 => std::fs::remove_file(&p),
        7 | 8 => std::fs::rename(&p, &q),
        9 => std::os::unix::fs::symlink(format!("../t{}", rng.below(9)), &p),
        10 => std::fs::hard_link(&p, &q),
        _ => {
            if rng.below(2) == 0 {
                std::fs::set_permissions(
                    &p,
                    std::fs::Permissions::from_mode(0o600 + rng.below(0o100) as u32),
                )
            } else {
                rustix::fs::lsetxattr(
                    &p,
                    "user.tag",
                    format!("v{}", rng.below(5)).as_bytes(),
                    rustix::fs::XattrFlags::empty(),
                )
                .map_err(Into::into)
            }
        }
    };
    format!("{op}:{:?}", r.map_err(|e| e.raw_os_error()))
}

/// Every entry under `root`: type, mode, owner, size, link count, mtime, content or target, user xattrs.
fn snapshot(root: &Path, times: bool) -> BTreeMap<String, String> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>, times: bool) {
        for e in std::fs::read_dir(dir).expect("read dir") {
            let e = e.expect("entry");
            let name = e.file_name().to_string_lossy().into_owned();
            let r = format!("{rel}/{name}");
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).expect("stat");
            let mut xbuf = vec![0u8; 256];
            let x = rustix::fs::lgetxattr(&p, "user.tag", &mut xbuf)
                .map(|n| String::from_utf8_lossy(&xbuf[..n]).into_owned())
                .unwrap_or_default();
            let what = if md.is_dir() {
                String::from("dir")
            } else if md.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).expect("readlink").display())
            } else {
                {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    std::fs::read(&p).expect("read").hash(&mut h);
                    format!("file {:x} ino {}", h.finish(), md.ino())
                }
            };
            let mtime = if md.is_dir() || !times {
                0
            } else {
                md.mtime_nsec() + md.mtime() * 1_000_000_000
            };
            out.insert(
                r.clone(),
                format!(
                    "{what} mode {:o} uid {} size {} mtime {mtime} x {x}",
                    md.mode(),
                    md.uid(),
                    if md.is_dir() { 0 } else { md.len() }
                ),
            );
            if md.is_dir() {
                walk(&p, &r, out, times);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out, times);
    // Inode numbers differ between layers: keep only which names share one (hard links), as the first such name.
    // Link counts are not compared: with `index=off` overlayfs reports a lower inode's own count, which includes
    // names a higher layer deleted; a merged layer has only the visible names.
    let mut first = std::collections::HashMap::new();
    for (k, v) in out.iter_mut() {
        if let Some(pos) = v.find(" ino ") {
            let rest = &v[pos + 5..];
            let end = rest.find(' ').unwrap_or(rest.len());
            let ino = rest[..end].to_string();
            let group = first
                .entry(ino.clone())
                .or_insert_with(|| k.clone())
                .clone();
            *v = v.replacen(&format!(" ino {ino}"), &format!(" linkgroup {group}"), 1);
        }
    }
    out
}

/// Panics with the entries that differ (not the whole trees).
fn assert_same(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>, what: &str) {
    let mut diffs = Vec::new();
    for k in got
        .keys()
        .chain(want.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        if got.get(k) != want.get(k) {
            diffs.push(format!("{k}: got {:?}, want {:?}", got.get(k), want.get(k)));
        }
    }
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

fn view(m: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", m.as_raw_fd()))
}

struct Lab {
    dir: tempfile::TempDir,
    n: usize,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base");
        for d in ["a", "a/b", "b", "c/d"] {
            std::fs::create_dir_all(base.join(d)).expect("mkdir");
        }
        std::fs::write(base.join("a/c"), "base a/c").expect("write");
        std::fs::write(base.join("b/a"), "base b/a").expect("write");
        std::fs::write(base.join("d"), "base d").expect("write");
        Lab { dir, n: 0 }
    }
    fn base(&self) -> PathBuf {
        self.dir.path().join("base")
    }
    fn fresh(&mut self, what: &str) -> PathBuf {
        self.n += 1;
        let p = self.dir.path().join(format!("{what}{}", self.n));
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }
    /// Mounts a new generation (fresh upper) over `lowers`, runs `ops` random operations, and returns the
    /// frozen upper and the operations' results.
    fn generation(
        &mut self,
        lowers: &[PathBuf],
        rng: &mut Rng,
        ops: usize,
    ) -> (PathBuf, Vec<String>) {
        let upper = self.fresh("layer");
        let stack = LayerStack {
            lowers: lowers.to_vec(),
            upper: upper.clone(),
            work: self.fresh("work"),
        };
        let m = stack.fsmount().expect("mount generation");
        let results = (0..ops).map(|_| random_op(rng, &view(&m))).collect();
        (upper, results)
    }
}

fn tree(lowers: &[PathBuf]) -> BTreeMap<String, String> {
    snapshot(&view(&fsmount_readonly(lowers).expect("mount view")), true)
}

fn tree_without_times(lowers: &[PathBuf]) -> BTreeMap<String, String> {
    snapshot(&view(&fsmount_readonly(lowers).expect("mount view")), false)
}

fn check_seed(seed: u64) {
    let mut rng = Rng(seed);
    let mut lab = Lab::new();
    // 12 generations of random operations: layers[0] is the newest.
    let mut layers: Vec<PathBuf> = Vec::new();
    for _ in 0..12 {
        let mut lowers = layers.clone();
        lowers.push(lab.base());
        let (l, _) = lab.generation(&lowers, &mut rng, 25);
        layers.insert(0, l);
    }
    let base = lab.base();
    let with_base = |ls: &[PathBuf]| -> Vec<PathBuf> {
        let mut v = ls.to_vec();
        v.push(base.clone());
        v
    };
    let expected = tree(&with_base(&layers));
    // Several runs, including merges of merged layers.
    let a = lab.fresh("merged");
    merge_layers(&layers[8..12], &a).expect("merge 8..12");
    let b = lab.fresh("merged");
    merge_layers(&layers[4..8], &b).expect("merge 4..8");
    let c = lab.fresh("merged");
    merge_layers(
        &[
            layers[1].clone(),
            layers[2].clone(),
            layers[3].clone(),
            b.clone(),
            a.clone(),
        ],
        &c,
    )
    .expect("merge of merged");
    let d = lab.fresh("merged");
    merge_layers(&layers[0..12], &d).expect("merge all");
    let variants: Vec<(&str, Vec<PathBuf>)> = vec![
        ("bottom run", [&layers[..8], &[a.clone()][..]].concat()),
        (
            "middle run",
            [&layers[..4], std::slice::from_ref(&b), &layers[8..]].concat(),
        ),
        (
            "two merged",
            [&layers[..4], &[b.clone(), a.clone()][..]].concat(),
        ),
        ("merge of merged", vec![layers[0].clone(), c.clone()]),
        ("everything", vec![d.clone()]),
    ];
    for (what, chain) in &variants {
        let got = tree(&with_base(chain));
        assert_same(
            &got,
            &expected,
            &format!("seed {seed}: {what}: merged view differs"),
        );
    }
    // The next generation behaves the same on either chain.
    for (what, chain) in &variants {
        let mut r1 = Rng(seed ^ 0x5555);
        let mut r2 = Rng(seed ^ 0x5555);
        let (u1, res1) = lab.generation(&with_base(&layers), &mut r1, 60);
        let (u2, res2) = lab.generation(&with_base(chain), &mut r2, 60);
        assert_eq!(
            res1, res2,
            "seed {seed}: {what}: operations on top behaved differently"
        );
        let t1 = tree_without_times(&with_base(&[&[u1][..], &layers[..]].concat()));
        let t2 = tree_without_times(&with_base(&[&[u2][..], &chain[..]].concat()));
        assert_same(
            &t2,
            &t1,
            &format!("seed {seed}: {what}: tree after the next generation differs"),
        );
    }
}

#[test]
fn merged_layers_mean_the_same_as_the_run() {
    let seeds: u64 = std::env::var("DELTABOX_COMPACT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for seed in 1..=seeds {
        check_seed(seed * 7919 + 17);
    }
}

#[test]
fn renamed_directories_keep_their_lower_contents() {
    // Deterministic: a directory renamed twice across generations, then moved into another renamed directory.
    let mut lab = Lab::new();
    let base = lab.base();
    std::fs::create_dir_all(base.join("x/y")).expect("mkdir");
    std::fs::write(base.join("x/y/f"), "deep").expect("write");
    let mut layers: Vec<PathBuf> = Vec::new();
    let steps: [&dyn Fn(&Path); 3] = [
        &|r: &Path| std::fs::rename(r.join("x"), r.join("x2")).expect("rename x"),
        &|r: &Path| std::fs::rename(r.join("x2/y"), r.join("a/y2")).expect("rename y"),
        &|r: &Path| std::fs::rename(r.join("a"), r.join("c/a3")).expect("rename a"),
    ];
    for step in steps {
        let mut lowers = layers.clone();
        lowers.push(base.clone());
        let upper = lab.fresh("layer");
        let stack = LayerStack {
            lowers,
            upper: upper.clone(),
            work: lab.fresh("work"),
        };
        let m = stack.fsmount().expect("mount");
        step(&view(&m));
        layers.insert(0, upper);
    }
    let all = [&layers[..], &[base.clone()][..]].concat();
    let expected = tree(&all);
    assert!(expected.contains_key("/c/a3/y2/f"), "{expected:?}");
    let m = lab.fresh("merged");
    merge_layers(&layers, &m).expect("merge");
    assert_same(&tree(&[m.clone(), base.clone()]), &expected, "merge all");
    let m2 = lab.fresh("merged");
    merge_layers(&layers[1..], &m2).expect("merge");
    assert_same(
        &tree(&[layers[0].clone(), m2, base]),
        &expected,
        "merge bottom two",
    );
}
