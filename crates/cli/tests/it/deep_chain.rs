//! A chain 10,000 checkpoints deep (overlayfs alone stops at 500 layers): background compaction keeps every
//! chain short, and any checkpoint of the lineage still restores exactly, through merged layers.

use crate::common::*;

#[test]
fn ten_thousand_checkpoints_deep_restore_exactly() {
    let n: usize = std::env::var("DELTABOX_DEEP_CHAIN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let (code, _, err) = d.sh(
        &id,
        "mkdir -p /work/dir0 && echo 0 > /work/n && echo keep > /work/dir0/f",
    );
    assert_eq!(code, 0, "{err}");
    // (checkpoint number, id, expected /work/n, expected directory name)
    let mut marks: Vec<(usize, String, usize, usize)> = Vec::new();
    let (mut value, mut dir) = (0, 0);
    for i in 1..=n {
        if i % 1000 == 500 {
            // Change a file and rename a directory (a redirect the merges must carry) now and then.
            let (code, _, err) = d.sh(
                &id,
                &format!("echo {i} > /work/n && mv /work/dir{dir} /work/dir{i}"),
            );
            assert_eq!(code, 0, "{err}");
            value = i;
            dir = i;
        }
        let c = d.ok(&["checkpoint", &id]).trim().to_string();
        if i == 1 || i % 2500 == 0 || i == n || i == n / 3 {
            marks.push((i, c, value, dir));
        }
    }
    let list = d.json(&["checkpoints", &id, "--json"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), n);
    let last = &list[n - 1];
    assert_eq!(last["depth"].as_u64(), Some(n as u64));
    let most_layers = list
        .iter()
        .filter_map(|c| c["layers"].as_u64())
        .max()
        .unwrap();
    eprintln!(
        "deep chain: {n} checkpoints; the last has {} layers; the longest chain {most_layers}",
        last["layers"]
    );
    assert!(
        most_layers < 200,
        "chains stayed long: {most_layers} layers"
    );
    for (i, c, value, dir) in &marks {
        d.ok(&["rollback", &id, c]);
        let (code, out, err) = d.sh(&id, &format!("cat /work/n /work/dir{dir}/f && ls /work"));
        assert_eq!(code, 0, "rollback to checkpoint #{i}: {err}");
        assert_eq!(
            out,
            format!("{value}\nkeep\ndir{dir}\nn\n"),
            "rollback to checkpoint #{i}"
        );
    }
    // A fork of a deep checkpoint too.
    let (i, c, value, dir) = &marks[marks.len() / 2];
    let fork = d.ok(&["fork", c]).trim().to_string();
    let (_, out, _) = d.sh(&fork, &format!("cat /work/n /work/dir{dir}/f"));
    assert_eq!(out, format!("{value}\nkeep\n"), "fork of checkpoint #{i}");
    d.stop_and_check(&[id, fork]);
}

#[test]
fn compacted_chains_survive_a_daemon_restart() {
    let mut d = TestDaemon::start_with(&[
        ("DELTABOX_COMPACT_AT", "4"),
        ("DELTABOX_COMPACT_FANOUT", "2"),
    ]);
    let id = d.create(&[]);
    let mut cks = Vec::new();
    for i in 0..24 {
        let (code, _, err) = d.sh(&id, &format!("mkdir -p /work/d{i} && echo {i} > /work/n"));
        assert_eq!(code, 0, "{err}");
        cks.push(d.ok(&["checkpoint", &id]).trim().to_string());
    }
    let compacted = |d: &TestDaemon| {
        d.json(&["checkpoints", &id, "--json"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["layers"].as_u64() < c["depth"].as_u64())
            .count()
    };
    eventually("background compaction", || compacted(&d) >= 16);
    // The daemon dies (its sandbox with it) and comes back: merged layers and rewritten chains are durable, and
    // the start-up sweep keeps every layer something still needs.
    d.kill9();
    d.spawn();
    for (i, c) in cks.iter().enumerate().step_by(5).chain([(23, &cks[23])]) {
        d.ok(&["rollback", &id, c]);
        let (code, out, err) = d.sh(&id, "cat /work/n; ls /work | grep -c '^d'");
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out,
            format!("{i}\n{}\n", i + 1),
            "rollback to checkpoint #{i} after restart"
        );
    }
    // And it goes on checkpointing on top of the compacted chain.
    let (code, _, _) = d.sh(&id, "echo more > /work/n");
    assert_eq!(code, 0);
    let c = d.ok(&["checkpoint", &id]).trim().to_string();
    d.ok(&["rollback", &id, &cks[3]]);
    d.ok(&["rollback", &id, &c]);
    assert_eq!(d.sh(&id, "cat /work/n").1, "more\n");
    d.stop_and_check(&[id]);
}
