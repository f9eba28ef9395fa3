//! `deltabox bench fs`: DeltaFS checkpoint and rollback latency against tree size and chain depth, with the
//! baselines measured in the same run (`cp -a` and `cp -a --reflink=always` on the same XFS layer store, btrfs
//! snapshots on a btrfs loop image), and the slowdown of a git/python/pip workload inside DeltaFS against the
//! same workload on the host. Prints numbers; asserts none.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use deltabox_daemon::api::{CheckpointInfo, CreateSandbox, ExecBody, ExecResult, SandboxInfo};
use deltabox_daemon::Client;

/// Median and p99 of a sample, in ms.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (pick(0.5), pick(0.99))
}

async fn exec(c: &Client, id: &str, script: &str) -> Result<ExecResult> {
    let body = ExecBody {
        argv: vec!["bash".into(), "-c".into(), script.into()],
        timeout_ms: Some(600_000),
        ..Default::default()
    };
    let r: ExecResult = c.exec(id, &body).await?;
    ensure!(
        r.exit_code == Some(0),
        "bench step failed: {script}: {}",
        r.stderr
    );
    Ok(r)
}

async fn checkpoint(c: &Client, id: &str) -> Result<(String, f64)> {
    let (ck, ms) = checkpoint_info(c, id).await?;
    Ok((ck.id, ms))
}

async fn checkpoint_info(c: &Client, id: &str) -> Result<(CheckpointInfo, f64)> {
    let t = Instant::now();
    let ck: CheckpointInfo = c.checkpoint(id).await?;
    Ok((ck, t.elapsed().as_secs_f64() * 1e3))
}

/// The filesystem part of a checkpoint: mounting the new generation and pivoting the sandbox onto it.
fn fs_part_ms(ck: &CheckpointInfo) -> f64 {
    ck.switch.as_ref().map_or(0.0, |s| s.mount_us as f64 / 1e3)
}

async fn rollback(c: &Client, id: &str, cid: &str) -> Result<f64> {
    let t = Instant::now();
    c.rollback(id, cid).await?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn timed_cmd(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let st = cmd.status().with_context(|| format!("{cmd:?}"))?;
    ensure!(st.success(), "{cmd:?}: {st}");
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

const MAKE_TREE: &str = "python3 -c 'import os,sys\nn=int(sys.argv[1]); r=sys.argv[2]\nfor i in range(n):\n    d=os.path.join(r, str(i % 100), str(i // 100 % 100))\n    os.makedirs(d, exist_ok=True)\n    open(os.path.join(d, str(i)), \"w\").write(\"x\" * 64)'";

/// The workload: git over a few hundred files, byte-compiling them, a venv and a local pip install.
const WORKLOAD: &str = r#"set -e; W=$1; rm -rf $W; mkdir -p $W/pkg/hello && cd $W
for i in $(seq 300); do printf 'def f%d(x):\n    return x + %d\n' $i $i > m$i.py; done
git init -q -b main . && git add -A && git -c user.email=a@b.invalid -c user.name=b commit -qm one
sed -i 's/return x/return 2 * x/' m1*.py && git -c user.email=a@b.invalid -c user.name=b commit -qam two && git log --oneline >/dev/null
/usr/bin/python3 -m compileall -q . >/dev/null
printf 'def hi():\n    return 42\n' > pkg/hello/__init__.py
printf '[build-system]\nrequires=["setuptools"]\nbuild-backend="setuptools.build_meta"\n[project]\nname="hello"\nversion="0.1"\n' > pkg/pyproject.toml
/usr/bin/python3 -m venv --system-site-packages v && v/bin/pip install -q --no-index --no-build-isolation ./pkg && v/bin/python -c 'import hello'"#;

/// Runs the filesystem benchmark.
pub async fn fs(client: &Client, state_dir: &Path, quick: bool) -> Result<i32> {
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let depths: &[usize] = if quick {
        &[1, 100, 1_000]
    } else {
        &[1, 100, 1_000, 10_000]
    };
    let workload_depths: &[usize] = if quick { &[1, 100] } else { &[1, 100, 500] };
    let reps = if quick { 5 } else { 15 };
    let scratch = ScratchDir(state_dir.join("store/bench-scratch"));
    let _ = std::fs::remove_dir_all(&*scratch);
    std::fs::create_dir_all(&*scratch)?;
    let create = |c: &'static str| CreateSandbox {
        memory: Some(c.into()),
        ..Default::default()
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "deltabox bench fs: kernel {}, layer store {}, {reps} reps per cell",
        kernel.trim(),
        deltabox_daemon::storefs::fs_type(&state_dir.join("store"))
    );
    println!(
        "\ncheckpoint / rollback against tree size (each checkpoint after touching one file):"
    );
    println!(
        "{:>8} {:>22} {:>12} {:>22} {:>12} {:>18} {:>19}",
        "files",
        "checkpoint med (p99)",
        "fs part med",
        "rollback med (p99)",
        "cp -a",
        "cp -a --reflink",
        "btrfs snap / rb med"
    );
    for &n in sizes {
        let sb: SandboxInfo = client.create(&create("4G")).await?;
        exec(client, &sb.id, &format!("{MAKE_TREE} {n} /work/tree")).await?;
        let (base, _) = checkpoint(client, &sb.id).await?;
        let (mut cks, mut fs_parts) = (Vec::new(), Vec::new());
        for i in 0..reps {
            exec(client, &sb.id, &format!("touch /work/tree/0/0/touched{i}")).await?;
            let (ck, ms) = checkpoint_info(client, &sb.id).await?;
            cks.push(ms);
            fs_parts.push(fs_part_ms(&ck));
        }
        let mut rbs = Vec::new();
        for _ in 0..reps.min(8) {
            rbs.push(rollback(client, &sb.id, &base).await?);
        }
        client.remove(&sb.id).await?;
        // Baselines on the same filesystem: copy the same tree.
        let src = scratch.join(format!("src{n}"));
        let st = Command::new("bash")
            .arg("-c")
            .arg(format!("{MAKE_TREE} {n} {}", src.display()))
            .status()?;
        ensure!(st.success(), "making the baseline tree failed");
        let cp = timed_cmd(
            Command::new("cp")
                .arg("-a")
                .arg(&src)
                .arg(scratch.join(format!("cp{n}"))),
        )?;
        let rl = timed_cmd(
            Command::new("cp")
                .args(["-a", "--reflink=always"])
                .arg(&src)
                .arg(scratch.join(format!("rl{n}"))),
        );
        let (cm, cp99) = stats(cks);
        let (fm, _) = stats(fs_parts);
        let (rm, rp99) = stats(rbs);
        let rl = rl
            .map(|v| format!("{v:.1} ms"))
            .unwrap_or_else(|_| "n/a".into());
        let btrfs = match btrfs_snapshots(n, reps) {
            Ok((s, r)) => format!("{s:.2} / {r:.2} ms"),
            Err(e) => {
                eprintln!("btrfs baseline not measured: {e:#}");
                "n/a".into()
            }
        };
        println!(
            "{n:>8} {:>22} {:>12} {:>22} {:>12} {:>18} {:>19}",
            format!("{cm:.2} ms ({cp99:.2})"),
            format!("{fm:.2} ms"),
            format!("{rm:.2} ms ({rp99:.2})"),
            format!("{cp:.1} ms"),
            rl,
            btrfs
        );
    }
    drop(scratch);

    println!("\ncheckpoint / rollback against chain depth (1k-file tree; a file changed every 10th checkpoint while the");
    println!("chain is built; old layers merged in the background, so a chain's overlay layers stay few however deep");
    println!("it is; `layers`: the last checkpoint's; rollback: to the last checkpoint):");
    println!(
        "{:>12} {:>7} {:>22} {:>12} {:>22} {:>16}",
        "depths",
        "layers",
        "checkpoint med (p99)",
        "fs part med",
        "rollback med (p99)",
        "time to build"
    );
    let sb: SandboxInfo = client.create(&create("2G")).await?;
    exec(client, &sb.id, &format!("{MAKE_TREE} 1000 /work/tree")).await?;
    let mut depth = 0;
    let built = Instant::now();
    for &target in depths {
        while depth + 1 < target {
            if depth % 10 == 0 {
                exec(client, &sb.id, &format!("echo {depth} > /work/tree/0/0/d")).await?;
            }
            checkpoint(client, &sb.id).await?;
            depth += 1;
        }
        let build_s = built.elapsed().as_secs_f64();
        let (mut cks, mut fs_parts) = (Vec::new(), Vec::new());
        let mut last = None;
        for _ in 0..reps {
            let (ck, ms) = checkpoint_info(client, &sb.id).await?;
            cks.push(ms);
            fs_parts.push(fs_part_ms(&ck));
            last = Some(ck);
        }
        depth += reps;
        let last = last.context("no checkpoint")?;
        let mut rbs = Vec::new();
        for _ in 0..reps.min(5) {
            rbs.push(rollback(client, &sb.id, &last.id).await?);
        }
        let (cm, cp99) = stats(cks);
        let (fm, _) = stats(fs_parts);
        let (rm, rp99) = stats(rbs);
        println!(
            "{:>12} {:>7} {:>22} {:>12} {:>22} {:>16}",
            format!("{target}-{}", last.depth),
            last.layers,
            format!("{cm:.2} ms ({cp99:.2})"),
            format!("{fm:.2} ms"),
            format!("{rm:.2} ms ({rp99:.2})"),
            format!("{build_s:.1} s total")
        );
    }
    client.remove(&sb.id).await?;

    println!("\nworkload (git over 300 files, compileall, venv + local pip install), seconds, interleaved rounds:");
    let rounds = if quick { 2 } else { 4 };
    let native_dir = tempfile_dir()?;
    let mut native = Vec::new();
    let mut in_box: Vec<(usize, Vec<f64>)> =
        workload_depths.iter().map(|&d| (d, Vec::new())).collect();
    let mut boxes = Vec::new();
    for &d in workload_depths {
        let sb: SandboxInfo = client.create(&create("2G")).await?;
        for i in 0..d.saturating_sub(1) {
            exec(
                client,
                &sb.id,
                &format!("mkdir -p /work && echo {i} > /work/depth"),
            )
            .await?;
            checkpoint(client, &sb.id).await?;
        }
        boxes.push(sb.id);
    }
    for _ in 0..rounds {
        // Same programs as inside (the sandbox's PATH: Debian's python3, not a user's pyenv).
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(WORKLOAD)
            .arg("w")
            .arg(native_dir.join("w"));
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        native.push(timed_cmd(&mut cmd)? / 1e3);
        for (i, id) in boxes.iter().enumerate() {
            let r = exec(
                client,
                id,
                &format!("bash -c {} w /work/w", shell_quote(WORKLOAD)),
            )
            .await?;
            in_box[i].1.push(r.duration_ms / 1e3);
        }
    }
    drop(native_dir);
    let (nm, _) = stats(native.clone());
    println!("{:>22} {:>10.3}", "native (host ext4)", nm);
    for (d, v) in in_box {
        let (m, _) = stats(v);
        println!(
            "{:>22} {:>10.3}   {:.2}x",
            format!("DeltaFS depth {d}"),
            m,
            m / nm
        );
    }
    for id in boxes {
        client.remove(&id).await?;
    }
    println!("\nfirst in-place write to a large file that lives in a frozen layer (overlayfs copy-up), by store filesystem:");
    for fs in ["xfs", "ext4"] {
        match copy_up(fs, if quick { 256 } else { 1024 }) {
            Ok((mb, ms)) => println!("{fs:>8}: {mb} MiB file: first 1-byte write {ms:.2} ms"),
            Err(e) => println!("{fs:>8}: not measured ({e:#})"),
        }
    }
    Ok(0)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A scratch directory removed when dropped, whatever happened in between.
struct ScratchDir(std::path::PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> Result<ScratchDir> {
    let d = std::env::temp_dir().join(format!("deltabox-bench-native-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(ScratchDir(d))
}

/// Makes a filesystem on image `img` with `mkfs` (program and options) and loop-mounts it at `mnt`.
fn mkfs_and_mount(mkfs: &[&str], img: &Path, mnt: &Path) -> Result<()> {
    let out = Command::new(mkfs[0]).args(&mkfs[1..]).arg(img).output()?;
    ensure!(
        out.status.success(),
        "{}: {}",
        mkfs[0],
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(img)
            .arg(mnt)
            .status()?
            .success(),
        "mount {}",
        img.display()
    );
    Ok(())
}

/// The btrfs baseline on a fresh btrfs loop image: the same tree in a subvolume; checkpoint = read-only snapshot
/// after touching one file, rollback = a writable snapshot of the checkpoint (the new working copy; deleting the
/// old one, which btrfs does slowly in the background, is not counted). Medians in ms.
fn btrfs_snapshots(n: usize, reps: usize) -> Result<(f64, f64)> {
    use std::os::fd::AsFd;
    let dir = std::env::temp_dir().join(format!("deltabox-btrfs-{}", std::process::id()));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let img = dir.join("img");
    std::fs::File::create(&img)?.set_len(4 << 30)?;
    let result = (|| -> Result<(f64, f64)> {
        mkfs_and_mount(&["mkfs.btrfs", "-q", "-f"], &img, &mnt)?;
        let out = Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(mnt.join("work"))
            .output()?;
        ensure!(
            out.status.success(),
            "btrfs subvolume create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let st = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{MAKE_TREE} {n} {}",
                mnt.join("work/tree").display()
            ))
            .status()?;
        ensure!(st.success(), "making the btrfs tree failed");
        let parent = std::fs::File::open(&mnt)?;
        let (mut snaps, mut rbs) = (Vec::new(), Vec::new());
        for i in 0..reps {
            std::fs::write(mnt.join(format!("work/tree/0/0/touched{i}")), b"")?;
            let work = std::fs::File::open(mnt.join("work"))?;
            let name = std::ffi::CString::new(format!("ck{i}"))?;
            let t = Instant::now();
            deltabox_sys::btrfs::snapshot(work.as_fd(), parent.as_fd(), &name, true)?;
            snaps.push(t.elapsed().as_secs_f64() * 1e3);
        }
        for i in 0..reps.min(8) {
            let ck = std::fs::File::open(mnt.join("ck0"))?;
            let name = std::ffi::CString::new(format!("rb{i}"))?;
            let t = Instant::now();
            deltabox_sys::btrfs::snapshot(ck.as_fd(), parent.as_fd(), &name, false)?;
            rbs.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((stats(snaps).0, stats(rbs).0))
    })();
    let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Times the copy-up of a `mb` MiB file from a lower layer on a fresh `fs` filesystem (a loop image): the cost the
/// first in-place edit of a checkpointed file pays. XFS shares extents (reflink); ext4 copies the data.
fn copy_up(fs: &str, mb: usize) -> Result<(usize, f64)> {
    use std::io::{Seek, SeekFrom, Write};
    let dir = std::env::temp_dir().join(format!("deltabox-copyup-{fs}-{}", std::process::id()));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let img = dir.join("img");
    std::fs::File::create(&img)?.set_len(((mb as u64 + 512) * 3) << 20)?;
    let cleanup = |dir: &Path| {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(dir.join("mnt/merged"))
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(dir.join("mnt"))
            .status();
        let _ = std::fs::remove_dir_all(dir);
    };
    let result = (|| -> Result<(usize, f64)> {
        let mkfs: &[&str] = if fs == "xfs" {
            &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]
        } else {
            &["mkfs.ext4", "-q", "-F"]
        };
        mkfs_and_mount(mkfs, &img, &mnt)?;
        for d in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir_all(mnt.join(d))?;
        }
        let mut f = std::fs::File::create(mnt.join("lower/big"))?;
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..mb {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        drop(f);
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            mnt.join("lower").display(),
            mnt.join("upper").display(),
            mnt.join("work").display()
        );
        ensure!(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(mnt.join("merged"))
                .status()?
                .success(),
            "mount overlay"
        );
        let t = Instant::now();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("merged/big"))?;
        f.seek(SeekFrom::Start(4096))?;
        f.write_all(b"x")?;
        drop(f);
        Ok((mb, t.elapsed().as_secs_f64() * 1e3))
    })();
    cleanup(&dir);
    result
}
