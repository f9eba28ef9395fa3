//! Which layers to merge, and how chains are rewritten to use merged layers.
//!
//! Every frozen layer covers a *span* of checkpoints: 1 for a layer a checkpoint froze, `F^k` for a layer merged
//! at level k (F = fan-out). Merges are aligned by depth from the bottom of the chain: F adjacent layers of span
//! s whose bottom starts at a depth divisible by `F·s` become one layer of span `F·s`. Alignment makes the merges
//! of branches that share a prefix identical (same parts, hence one merged layer for all of them), and it keeps a
//! chain of depth d down to at most `(F−1)·log_F(d)` merged layers plus the recent, not yet merged ones: a chain
//! 10,000 checkpoints deep needs tens of overlay layers, not 10,000.
//!
//! Nothing here touches files: the daemon builds merged layers with `deltabox_fs::compact::merge_layers` and
//! records them; [`MergeIndex::rewrite`] then replaces any run of a chain that a merged layer covers.

use std::collections::{HashMap, HashSet};

/// A merged layer: `parts` (layer ids, topmost first) merged into layer `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedLayer {
    /// Layer id of the result (`m-…`).
    pub id: String,
    /// The run it replaces, topmost first.
    pub parts: Vec<String>,
    /// Checkpoints covered.
    pub span: u64,
}

/// The merged layers that exist, indexed for rewriting chains.
#[derive(Debug, Default, Clone)]
pub struct MergeIndex {
    by_id: HashMap<String, MergedLayer>,
    /// Bottom part id -> merged layer ids whose run starts (from the bottom) there.
    by_bottom: HashMap<String, Vec<String>>,
    by_parts: HashMap<Vec<String>, String>,
}

impl MergeIndex {
    /// An index of `layers`.
    pub fn new(layers: impl IntoIterator<Item = MergedLayer>) -> MergeIndex {
        let mut ix = MergeIndex::default();
        for l in layers {
            ix.insert(l);
        }
        ix
    }

    /// Adds a merged layer.
    pub fn insert(&mut self, m: MergedLayer) {
        if let Some(bottom) = m.parts.last() {
            self.by_bottom
                .entry(bottom.clone())
                .or_default()
                .push(m.id.clone());
        }
        self.by_parts.insert(m.parts.clone(), m.id.clone());
        self.by_id.insert(m.id.clone(), m);
    }

    /// Forgets a merged layer (it was deleted).
    pub fn remove(&mut self, id: &str) {
        if let Some(m) = self.by_id.remove(id) {
            self.by_parts.remove(&m.parts);
            if let Some(bottom) = m.parts.last() {
                if let Some(v) = self.by_bottom.get_mut(bottom) {
                    v.retain(|x| x != id);
                }
            }
        }
    }

    /// Every merged layer id.
    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.by_id.keys()
    }

    /// The merged layer made of exactly `parts`, if one exists.
    pub fn by_parts(&self, parts: &[String]) -> Option<&str> {
        self.by_parts.get(parts).map(String::as_str)
    }

    /// Checkpoints a layer covers.
    pub fn span(&self, layer: &str) -> u64 {
        self.by_id.get(layer).map_or(1, |m| m.span)
    }

    /// Checkpoints a chain covers: its depth in checkpoints, whatever its number of layers.
    pub fn depth(&self, chain: &[String]) -> u64 {
        chain.iter().map(|l| self.span(l)).sum()
    }

    /// `chain` (topmost first) with every run that a merged layer covers replaced by that layer, largest first,
    /// until nothing more applies. `used` collects every merged layer the rewrite went through.
    pub fn rewrite_noting(&self, chain: &[String], used: &mut HashSet<String>) -> Vec<String> {
        // Work bottom-first: runs are aligned from the bottom.
        let mut cur: Vec<String> = chain.iter().rev().cloned().collect();
        loop {
            let mut out = Vec::with_capacity(cur.len());
            let mut changed = false;
            let mut i = 0;
            while i < cur.len() {
                let mut best: Option<&MergedLayer> = None;
                for id in self.by_bottom.get(&cur[i]).into_iter().flatten() {
                    let m = &self.by_id[id];
                    let n = m.parts.len();
                    if i + n <= cur.len()
                        && m.parts.iter().rev().eq(cur[i..i + n].iter())
                        && best.is_none_or(|b| b.parts.len() < n)
                    {
                        best = Some(m);
                    }
                }
                match best {
                    Some(m) => {
                        used.insert(m.id.clone());
                        out.push(m.id.clone());
                        i += m.parts.len();
                        changed = true;
                    }
                    None => {
                        out.push(cur[i].clone());
                        i += 1;
                    }
                }
            }
            cur = out;
            if !changed {
                break;
            }
        }
        cur.reverse();
        cur
    }

    /// [`MergeIndex::rewrite_noting`] without the bookkeeping.
    pub fn rewrite(&self, chain: &[String]) -> Vec<String> {
        self.rewrite_noting(chain, &mut HashSet::new())
    }

    /// The merges (each: parts topmost first, resulting span) that compact `chain` by one level wherever F aligned
    /// layers of equal span sit; empty when nothing can merge yet.
    pub fn next_merges(&self, chain: &[String], fanout: usize) -> Vec<(Vec<String>, u64)> {
        let f = fanout.max(2) as u64;
        let bottom_first: Vec<(&String, u64)> =
            chain.iter().rev().map(|l| (l, self.span(l))).collect();
        let mut merges = Vec::new();
        let (mut i, mut depth) = (0usize, 0u64);
        while i < bottom_first.len() {
            let s = bottom_first[i].1;
            let n = f as usize;
            let aligned = depth % (s * f) == 0;
            let group = bottom_first.get(i..i + n);
            if let Some(group) = group.filter(|g| aligned && g.iter().all(|(_, sp)| *sp == s)) {
                let parts: Vec<String> = group.iter().rev().map(|(l, _)| (*l).clone()).collect();
                merges.push((parts, s * f));
                depth += s * f;
                i += n;
            } else {
                depth += s;
                i += 1;
            }
        }
        merges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<String> {
        (1..=n).rev().map(|i| format!("l{i}")).collect()
    }

    /// Applies merges the way the daemon does, until the chain is shorter than `at`.
    fn compact(ix: &mut MergeIndex, c: &[String], f: usize, at: usize) -> Vec<String> {
        let mut c = ix.rewrite(c);
        while c.len() >= at {
            let merges = ix.next_merges(&c, f);
            if merges.is_empty() {
                break;
            }
            for (parts, span) in merges {
                if ix.by_parts(&parts).is_none() {
                    let id = format!("m{}", ix.by_id.len());
                    ix.insert(MergedLayer { id, parts, span });
                }
            }
            c = ix.rewrite(&c);
        }
        c
    }

    #[test]
    fn deep_chains_stay_short_and_keep_their_depth() {
        let mut ix = MergeIndex::default();
        let full = chain(10_000);
        let mut longest = 0;
        for d in 1..=10_000 {
            // Each checkpoint's chain is the previous one (as rewritten) plus a new layer, like the daemon's.
            let c = compact(&mut ix, &full[10_000 - d..], 16, 64);
            assert_eq!(ix.depth(&c), d as u64);
            longest = longest.max(c.len());
        }
        assert!(longest < 64 + 16, "{longest}");
        let c = compact(&mut ix, &full, 16, 2);
        assert!(c.len() <= 15 * 4, "{}", c.len());
        assert_eq!(ix.depth(&c), 10_000);
    }

    #[test]
    fn merges_are_aligned_so_branches_share_them() {
        let mut ix = MergeIndex::default();
        let a = chain(40);
        let mut b = chain(20);
        b.insert(0, "other".into());
        b.insert(0, "other2".into());
        let ca = compact(&mut ix, &a, 4, 2);
        let before = ix.by_id.len();
        let cb = compact(&mut ix, &b, 4, 2);
        // b shares l1..l20 with a: the level-1 merges of l1..l16 and l17..l20 are reused, not rebuilt.
        assert_eq!(ix.depth(&cb), 22);
        assert_eq!(ix.depth(&ca), 40);
        assert!(
            ix.by_id.len() - before <= 1,
            "{} new merges",
            ix.by_id.len() - before
        );
        assert_eq!(ca.last(), cb.last());
    }

    #[test]
    fn rewrite_only_replaces_whole_runs() {
        let ix = MergeIndex::new([MergedLayer {
            id: "m".into(),
            parts: vec!["l4".into(), "l3".into(), "l2".into(), "l1".into()],
            span: 4,
        }]);
        assert_eq!(ix.rewrite(&chain(5)), vec!["l5".to_string(), "m".into()]);
        assert_eq!(ix.rewrite(&chain(3)), chain(3));
        let mut other = chain(4);
        other[1] = "x".into();
        assert_eq!(ix.rewrite(&other), other);
    }
}
