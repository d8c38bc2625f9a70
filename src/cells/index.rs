//! The per-sequence position index of one stream: for every sequence, the ordered set of its
//! `(pos, cell)` pairs, as B+ trees whose nodes live in one pooled arena per stream.
//!
//! Why not `std::collections::BTreeSet`: std allocates a node on every split and frees it on
//! every merge, so a decode step (one insert per sequence when `prepare` simulates the
//! placement, one removal when it rolls back, one insert when the ubatch is applied) allocated
//! about once per five steps per sequence. Here freed nodes go to an intrusive free list and are
//! reused; the arena is reserved up front for a whole cache of single-sequence cells at the
//! worst fill a split leaves, so a stream growing to its size, and any number of
//! insert/remove cycles, never reach the allocator. Cells shared by many sequences can need
//! more nodes than reserved; the arena then grows (amortized) and keeps its high-water mark.
//!
//! Costs: insert and remove are O(log n + node size) (a removal that leaves a node less than a
//! quarter full merges it with, or refills it from, a sibling); min and max are O(1) (the
//! first and last leaf of each tree are tracked); a range or a predecessor query descends once
//! and then walks the linked leaves.
//!
//! Entries are `(pos, cell)` pairs packed into a `u64` whose unsigned order is the pair's order
//! (the sign bit of `pos` flipped into the high half, the cell in the low half).

#![forbid(unsafe_code)]

use std::collections::TryReserveError;

/// Entries per leaf (a leaf is 512 bytes).
const LCAP: usize = 62;
/// Children per inner node.
const ICAP: usize = 32;
/// A leaf below this many entries (not the root) is merged with or refilled from a sibling.
const LMIN: usize = LCAP / 4;
/// The same for inner nodes (children).
const IMIN: usize = ICAP / 4;
/// No node.
const NIL: u32 = u32::MAX;

#[inline]
fn key(pos: i32, cell: u32) -> u64 {
    (((pos as u32) ^ 0x8000_0000) as u64) << 32 | cell as u64
}

#[inline]
fn unkey(k: u64) -> (i32, u32) {
    ((((k >> 32) as u32) ^ 0x8000_0000) as i32, k as u32)
}

#[derive(Clone, Debug)]
struct Leaf {
    len: u32,
    /// Previous leaf of the same tree, NIL for the first.
    prev: u32,
    /// Next leaf of the same tree, NIL for the last; the free-list link when the leaf is free.
    next: u32,
    keys: [u64; LCAP],
}

const EMPTY_LEAF: Leaf = Leaf {
    len: 0,
    prev: NIL,
    next: NIL,
    keys: [0; LCAP],
};

/// `kids[j]` holds keys in `[keys[j], keys[j + 1])`; `keys[0]` is not used.
#[derive(Clone, Debug)]
struct Inner {
    len: u32,
    keys: [u64; ICAP],
    /// Children; `kids[0]` is the free-list link when the node is free.
    kids: [u32; ICAP],
}

const EMPTY_INNER: Inner = Inner {
    len: 0,
    keys: [0; ICAP],
    kids: [NIL; ICAP],
};

/// One sequence's tree.
#[derive(Clone, Copy, Debug)]
struct Tree {
    root: u32,
    /// 0: the root is a leaf.
    height: u32,
    len: u32,
    first: u32,
    last: u32,
}

const EMPTY_TREE: Tree = Tree {
    root: NIL,
    height: 0,
    len: 0,
    first: NIL,
    last: NIL,
};

enum Ins {
    Dup,
    Done,
    /// The node split; the new right sibling and its lower bound.
    Split(u64, u32),
}

/// The position index of one stream (see the module doc).
#[derive(Clone, Debug)]
pub struct PosIndex {
    trees: Vec<Tree>,
    leaves: Vec<Leaf>,
    inners: Vec<Inner>,
    free_leaf: u32,
    free_inner: u32,
}

/// A cursor: a leaf and an entry index in it. Canonical form: `i < len`, or the end of the
/// tree `(last, last.len)`, or `(NIL, 0)` for an empty tree.
type Pos = (u32, u32);

impl PosIndex {
    /// An index of `n_seq` empty sequences, with node memory reserved for `n_cells`
    /// single-sequence cells.
    pub fn try_new(n_seq: usize, n_cells: usize) -> Result<Self, TryReserveError> {
        let n_leaves = 2 * n_cells.div_ceil(LCAP) + 16;
        let n_inners = 2 * n_leaves.div_ceil(ICAP) + 16;
        let mut leaves = Vec::new();
        leaves.try_reserve_exact(n_leaves)?;
        let mut inners = Vec::new();
        inners.try_reserve_exact(n_inners)?;
        let mut trees = Vec::new();
        trees.try_reserve_exact(n_seq)?;
        trees.resize(n_seq, EMPTY_TREE);
        Ok(PosIndex {
            trees,
            leaves,
            inners,
            free_leaf: NIL,
            free_inner: NIL,
        })
    }

    /// Empties every sequence (node memory is kept).
    pub fn clear(&mut self) {
        self.trees.fill(EMPTY_TREE);
        self.leaves.clear();
        self.inners.clear();
        self.free_leaf = NIL;
        self.free_inner = NIL;
    }

    /// Number of entries of sequence `s`.
    #[inline]
    pub fn len(&self, s: usize) -> usize {
        self.trees[s].len as usize
    }

    /// Smallest entry of `s`.
    #[inline]
    pub fn first(&self, s: usize) -> Option<(i32, u32)> {
        let t = &self.trees[s];
        (t.first != NIL).then(|| unkey(self.leaves[t.first as usize].keys[0]))
    }

    /// Largest entry of `s`.
    #[inline]
    pub fn last(&self, s: usize) -> Option<(i32, u32)> {
        let t = &self.trees[s];
        (t.last != NIL).then(|| {
            let l = &self.leaves[t.last as usize];
            unkey(l.keys[l.len as usize - 1])
        })
    }

    /// True when `(pos, cell)` is in `s`.
    pub fn contains(&self, s: usize, pos: i32, cell: u32) -> bool {
        let k = key(pos, cell);
        let (l, i) = self.lower_bound(s, k);
        l != NIL && i < self.leaves[l as usize].len && self.leaves[l as usize].keys[i as usize] == k
    }

    /// Largest entry of `s` that is `<= (pos, cell)`.
    pub fn pred_le(&self, s: usize, pos: i32, cell: u32) -> Option<(i32, u32)> {
        let k = key(pos, cell);
        let t = &self.trees[s];
        if t.root == NIL {
            return None;
        }
        let l = self.descend(t, k);
        let leaf = &self.leaves[l as usize];
        let i = leaf.keys[..leaf.len as usize].partition_point(|&x| x <= k);
        if i > 0 {
            return Some(unkey(leaf.keys[i - 1]));
        }
        // Everything in earlier leaves is below this leaf's lower bound, hence below `k`.
        if leaf.prev == NIL {
            return None;
        }
        let p = &self.leaves[leaf.prev as usize];
        Some(unkey(p.keys[p.len as usize - 1]))
    }

    /// The entries of `s`, in order.
    pub fn iter(&self, s: usize) -> Iter<'_> {
        let t = &self.trees[s];
        let end = if t.last == NIL {
            (NIL, 0)
        } else {
            (t.last, self.leaves[t.last as usize].len)
        };
        let front = if t.first == NIL { end } else { (t.first, 0) };
        Iter {
            idx: self,
            front,
            back: end,
        }
    }

    /// The entries of `s` with position in `[p0, p1)`, in order.
    pub fn range(&self, s: usize, p0: i32, p1: i32) -> Iter<'_> {
        let front = self.lower_bound(s, key(p0, 0));
        let back = if p0 < p1 {
            self.lower_bound(s, key(p1, 0))
        } else {
            front
        };
        Iter {
            idx: self,
            front,
            back,
        }
    }

    /// Inserts `(pos, cell)` into `s`; false if it was there already.
    pub fn insert(&mut self, s: usize, pos: i32, cell: u32) -> bool {
        let k = key(pos, cell);
        let t = self.trees[s];
        if t.root == NIL {
            let l = self.alloc_leaf();
            let leaf = &mut self.leaves[l as usize];
            leaf.keys[0] = k;
            leaf.len = 1;
            self.trees[s] = Tree {
                root: l,
                height: 0,
                len: 1,
                first: l,
                last: l,
            };
            return true;
        }
        match self.insert_rec(s, t.root, t.height, k) {
            Ins::Dup => return false,
            Ins::Done => {}
            Ins::Split(sep, right) => {
                let r = self.alloc_inner();
                let n = &mut self.inners[r as usize];
                n.len = 2;
                n.kids[0] = t.root;
                n.kids[1] = right;
                n.keys[1] = sep;
                let t = &mut self.trees[s];
                t.root = r;
                t.height += 1;
            }
        }
        self.trees[s].len += 1;
        true
    }

    /// Removes `(pos, cell)` from `s`; false if it was not there.
    pub fn remove(&mut self, s: usize, pos: i32, cell: u32) -> bool {
        let k = key(pos, cell);
        let t = self.trees[s];
        if t.root == NIL {
            return false;
        }
        let Some(n) = self.remove_rec(s, t.root, t.height, k) else {
            return false;
        };
        let t = &mut self.trees[s];
        t.len -= 1;
        if t.height == 0 {
            if n == 0 {
                let root = t.root;
                self.trees[s] = EMPTY_TREE;
                self.free_leaf(root);
            }
        } else if n == 1 {
            // An inner root with one child: the child becomes the root.
            let root = t.root;
            t.root = self.inners[root as usize].kids[0];
            t.height -= 1;
            self.free_inner(root);
        }
        true
    }

    /// The leaf of `t` whose key range holds `k`.
    fn descend(&self, t: &Tree, k: u64) -> u32 {
        let mut node = t.root;
        for _ in 0..t.height {
            let n = &self.inners[node as usize];
            node = n.kids[child_of(n, k)];
        }
        node
    }

    /// The first entry of `s` that is `>= k`, as a canonical cursor.
    fn lower_bound(&self, s: usize, k: u64) -> Pos {
        let t = &self.trees[s];
        if t.root == NIL {
            return (NIL, 0);
        }
        let l = self.descend(t, k);
        let leaf = &self.leaves[l as usize];
        let i = leaf.keys[..leaf.len as usize].partition_point(|&x| x < k) as u32;
        if i == leaf.len && leaf.next != NIL {
            // Later leaves start at or above this leaf's upper bound, which is above `k`.
            return (leaf.next, 0);
        }
        (l, i)
    }

    fn insert_rec(&mut self, s: usize, node: u32, height: u32, k: u64) -> Ins {
        if height == 0 {
            return self.insert_leaf(s, node, k);
        }
        let n = &self.inners[node as usize];
        let j = child_of(n, k);
        let kid = n.kids[j];
        let (sep, right) = match self.insert_rec(s, kid, height - 1, k) {
            Ins::Split(sep, right) => (sep, right),
            r => return r,
        };
        // Insert (sep, right) after child j.
        let len = self.inners[node as usize].len as usize;
        if len < ICAP {
            let n = &mut self.inners[node as usize];
            n.keys.copy_within(j + 1..len, j + 2);
            n.kids.copy_within(j + 1..len, j + 2);
            n.keys[j + 1] = sep;
            n.kids[j + 1] = right;
            n.len += 1;
            return Ins::Done;
        }
        let mut keys = [0u64; ICAP + 1];
        let mut kids = [NIL; ICAP + 1];
        {
            let n = &self.inners[node as usize];
            keys[..=j].copy_from_slice(&n.keys[..=j]);
            kids[..=j].copy_from_slice(&n.kids[..=j]);
            keys[j + 1] = sep;
            kids[j + 1] = right;
            keys[j + 2..].copy_from_slice(&n.keys[j + 1..]);
            kids[j + 2..].copy_from_slice(&n.kids[j + 1..]);
        }
        let mid = ICAP / 2; // of the ICAP + 1 children, the left node keeps this many
        let r = self.alloc_inner();
        let rn = &mut self.inners[r as usize];
        rn.keys[..ICAP + 1 - mid].copy_from_slice(&keys[mid..]);
        rn.kids[..ICAP + 1 - mid].copy_from_slice(&kids[mid..]);
        rn.len = (ICAP + 1 - mid) as u32;
        let n = &mut self.inners[node as usize];
        n.keys[..mid].copy_from_slice(&keys[..mid]);
        n.kids[..mid].copy_from_slice(&kids[..mid]);
        n.len = mid as u32;
        Ins::Split(keys[mid], r)
    }

    fn insert_leaf(&mut self, s: usize, node: u32, k: u64) -> Ins {
        let leaf = &mut self.leaves[node as usize];
        let len = leaf.len as usize;
        let i = leaf.keys[..len].partition_point(|&x| x < k);
        if i < len && leaf.keys[i] == k {
            return Ins::Dup;
        }
        if len < LCAP {
            leaf.keys.copy_within(i..len, i + 1);
            leaf.keys[i] = k;
            leaf.len += 1;
            return Ins::Done;
        }
        let next = leaf.next;
        let r = self.alloc_leaf();
        if i == LCAP && next == NIL {
            // Appending past the end of the tree (a sequence growing): the new leaf takes only
            // the new entry, so leaves filled by appends stay full.
            let rl = &mut self.leaves[r as usize];
            rl.keys[0] = k;
            rl.len = 1;
        } else {
            let mid = LCAP / 2;
            let (a, b) = two_mut(&mut self.leaves, node as usize, r as usize);
            b.keys[..LCAP - mid].copy_from_slice(&a.keys[mid..]);
            b.len = (LCAP - mid) as u32;
            a.len = mid as u32;
            let (t, i) = if i <= mid { (a, i) } else { (b, i - mid) };
            let n = t.len as usize;
            t.keys.copy_within(i..n, i + 1);
            t.keys[i] = k;
            t.len += 1;
        }
        self.leaves[r as usize].prev = node;
        self.leaves[r as usize].next = next;
        self.leaves[node as usize].next = r;
        if next == NIL {
            self.trees[s].last = r;
        } else {
            self.leaves[next as usize].prev = r;
        }
        Ins::Split(self.leaves[r as usize].keys[0], r)
    }

    /// Removes `k` below `node`; the node's new length, None if `k` was absent.
    fn remove_rec(&mut self, s: usize, node: u32, height: u32, k: u64) -> Option<usize> {
        if height == 0 {
            let leaf = &mut self.leaves[node as usize];
            let len = leaf.len as usize;
            let i = leaf.keys[..len].partition_point(|&x| x < k);
            if i == len || leaf.keys[i] != k {
                return None;
            }
            leaf.keys.copy_within(i + 1..len, i);
            leaf.len -= 1;
            return Some(len - 1);
        }
        let j = child_of(&self.inners[node as usize], k);
        let kid = self.inners[node as usize].kids[j];
        let n = self.remove_rec(s, kid, height - 1, k)?;
        let min = if height == 1 { LMIN } else { IMIN };
        if n < min {
            self.fix_child(s, node, j, height - 1);
        }
        Some(self.inners[node as usize].len as usize)
    }

    /// Child `j` of `node` is under its minimum: merge it with a sibling, or even them out.
    fn fix_child(&mut self, s: usize, node: u32, j: usize, kid_height: u32) {
        let plen = self.inners[node as usize].len as usize;
        debug_assert!(plen >= 2);
        let b = if j + 1 < plen { j + 1 } else { j };
        let (a_id, b_id) = {
            let p = &self.inners[node as usize];
            (p.kids[b - 1], p.kids[b])
        };
        let merged = if kid_height == 0 {
            let (a, bl) = two_mut(&mut self.leaves, a_id as usize, b_id as usize);
            let (an, bn) = (a.len as usize, bl.len as usize);
            if an + bn <= LCAP {
                a.keys[an..an + bn].copy_from_slice(&bl.keys[..bn]);
                a.len = (an + bn) as u32;
                let next = bl.next;
                a.next = next;
                if next == NIL {
                    self.trees[s].last = a_id;
                } else {
                    self.leaves[next as usize].prev = a_id;
                }
                self.free_leaf(b_id);
                true
            } else {
                let total = an + bn;
                let left = total / 2;
                if an > left {
                    // Move a's tail to the front of b.
                    let m = an - left;
                    bl.keys.copy_within(..bn, m);
                    bl.keys[..m].copy_from_slice(&a.keys[left..an]);
                } else {
                    // Move b's head to the end of a.
                    let m = left - an;
                    a.keys[an..left].copy_from_slice(&bl.keys[..m]);
                    bl.keys.copy_within(m..bn, 0);
                }
                a.len = left as u32;
                bl.len = (total - left) as u32;
                self.inners[node as usize].keys[b] = bl.keys[0];
                false
            }
        } else {
            let sep = self.inners[node as usize].keys[b];
            let mut keys = [0u64; 2 * ICAP];
            let mut kids = [NIL; 2 * ICAP];
            let (an, bn) = {
                let (a, bi) = (&self.inners[a_id as usize], &self.inners[b_id as usize]);
                let (an, bn) = (a.len as usize, bi.len as usize);
                keys[..an].copy_from_slice(&a.keys[..an]);
                kids[..an].copy_from_slice(&a.kids[..an]);
                keys[an..an + bn].copy_from_slice(&bi.keys[..bn]);
                kids[an..an + bn].copy_from_slice(&bi.kids[..bn]);
                keys[an] = sep;
                (an, bn)
            };
            let total = an + bn;
            if total <= ICAP {
                let a = &mut self.inners[a_id as usize];
                a.keys[..total].copy_from_slice(&keys[..total]);
                a.kids[..total].copy_from_slice(&kids[..total]);
                a.len = total as u32;
                self.free_inner(b_id);
                true
            } else {
                let left = total / 2;
                let (a, bi) = two_mut(&mut self.inners, a_id as usize, b_id as usize);
                a.keys[..left].copy_from_slice(&keys[..left]);
                a.kids[..left].copy_from_slice(&kids[..left]);
                a.len = left as u32;
                bi.keys[..total - left].copy_from_slice(&keys[left..total]);
                bi.kids[..total - left].copy_from_slice(&kids[left..total]);
                bi.len = (total - left) as u32;
                self.inners[node as usize].keys[b] = keys[left];
                false
            }
        };
        if merged {
            let p = &mut self.inners[node as usize];
            p.keys.copy_within(b + 1..plen, b);
            p.kids.copy_within(b + 1..plen, b);
            p.len -= 1;
        }
    }

    fn alloc_leaf(&mut self) -> u32 {
        if self.free_leaf != NIL {
            let l = self.free_leaf;
            self.free_leaf = self.leaves[l as usize].next;
            self.leaves[l as usize] = EMPTY_LEAF;
            return l;
        }
        self.leaves.push(EMPTY_LEAF);
        (self.leaves.len() - 1) as u32
    }

    fn free_leaf(&mut self, l: u32) {
        let leaf = &mut self.leaves[l as usize];
        leaf.len = 0;
        leaf.prev = NIL;
        leaf.next = self.free_leaf;
        self.free_leaf = l;
    }

    fn alloc_inner(&mut self) -> u32 {
        if self.free_inner != NIL {
            let n = self.free_inner;
            self.free_inner = self.inners[n as usize].kids[0];
            self.inners[n as usize].len = 0;
            return n;
        }
        self.inners.push(EMPTY_INNER);
        (self.inners.len() - 1) as u32
    }

    fn free_inner(&mut self, n: u32) {
        let node = &mut self.inners[n as usize];
        node.len = 0;
        node.kids[0] = self.free_inner;
        self.free_inner = n;
    }

    /// Checks every tree's order, bounds, lengths, fill and leaf links (tests and debugging).
    pub fn check(&self) -> Result<(), String> {
        for (s, t) in self.trees.iter().enumerate() {
            if t.root == NIL {
                if t.len != 0 || t.first != NIL || t.last != NIL {
                    return Err(format!("seq {s}: empty tree with len/first/last set"));
                }
                continue;
            }
            let mut leaves = Vec::new();
            let n = self.check_node(t.root, t.height, true, 0, u64::MAX, &mut leaves)?;
            if n != t.len as usize {
                return Err(format!("seq {s}: len {} but {n} entries", t.len));
            }
            if leaves.first() != Some(&t.first) || leaves.last() != Some(&t.last) {
                return Err(format!("seq {s}: first/last leaf wrong"));
            }
            for w in leaves.windows(2) {
                if self.leaves[w[0] as usize].next != w[1]
                    || self.leaves[w[1] as usize].prev != w[0]
                {
                    return Err(format!("seq {s}: leaf links wrong"));
                }
            }
            if self.leaves[t.first as usize].prev != NIL || self.leaves[t.last as usize].next != NIL
            {
                return Err(format!("seq {s}: chain ends wrong"));
            }
            let walked: Vec<_> = self.iter(s).collect();
            let back: Vec<_> = self.iter(s).rev().collect();
            if walked.len() != n || !walked.iter().rev().eq(back.iter()) {
                return Err(format!("seq {s}: iteration disagrees"));
            }
        }
        Ok(())
    }

    /// Entries below `node`, all in `[lo, hi)`.
    fn check_node(
        &self,
        node: u32,
        height: u32,
        root: bool,
        lo: u64,
        hi: u64,
        leaves: &mut Vec<u32>,
    ) -> Result<usize, String> {
        if height == 0 {
            let l = &self.leaves[node as usize];
            let keys = &l.keys[..l.len as usize];
            // A leaf may hold fewer than LMIN entries: the one an append split off (it fills
            // up), or one never touched by a removal since. Only empty leaves are wrong.
            if l.len == 0 {
                return Err(format!("leaf {node}: empty"));
            }
            if keys.windows(2).any(|w| w[0] >= w[1]) || keys[0] < lo || keys[keys.len() - 1] >= hi {
                return Err(format!("leaf {node}: keys out of order or bounds"));
            }
            leaves.push(node);
            return Ok(keys.len());
        }
        let n = &self.inners[node as usize];
        let len = n.len as usize;
        if len < 2 || (!root && len < IMIN) {
            return Err(format!("inner {node}: underfull ({len})"));
        }
        let mut total = 0;
        for j in 0..len {
            let a = if j == 0 { lo } else { n.keys[j] };
            let b = if j + 1 == len { hi } else { n.keys[j + 1] };
            if a < lo || b > hi || a >= b {
                return Err(format!("inner {node}: separators out of order"));
            }
            total += self.check_node(n.kids[j], height - 1, false, a, b, leaves)?;
        }
        Ok(total)
    }
}

/// The child of `n` whose key range holds `k`.
#[inline]
fn child_of(n: &Inner, k: u64) -> usize {
    n.keys[1..n.len as usize].partition_point(|&x| x <= k)
}

fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    debug_assert_ne!(a, b);
    if a < b {
        let (x, y) = v.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

/// Entries of one sequence in order, from both ends.
pub struct Iter<'a> {
    idx: &'a PosIndex,
    front: Pos,
    back: Pos,
}

impl Iterator for Iter<'_> {
    type Item = (i32, u32);

    #[inline]
    fn next(&mut self) -> Option<(i32, u32)> {
        if self.front == self.back {
            return None;
        }
        let (l, i) = self.front;
        let leaf = &self.idx.leaves[l as usize];
        let k = leaf.keys[i as usize];
        self.front = if i + 1 == leaf.len && leaf.next != NIL {
            (leaf.next, 0)
        } else {
            (l, i + 1)
        };
        Some(unkey(k))
    }
}

impl DoubleEndedIterator for Iter<'_> {
    #[inline]
    fn next_back(&mut self) -> Option<(i32, u32)> {
        if self.front == self.back {
            return None;
        }
        let (mut l, mut i) = self.back;
        if i == 0 {
            l = self.idx.leaves[l as usize].prev;
            i = self.idx.leaves[l as usize].len;
        }
        i -= 1;
        self.back = (l, i);
        Some(unkey(self.idx.leaves[l as usize].keys[i as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    fn same(ix: &PosIndex, model: &[BTreeSet<(i32, u32)>]) {
        ix.check().unwrap();
        for (s, m) in model.iter().enumerate() {
            assert_eq!(ix.len(s), m.len());
            assert_eq!(ix.first(s), m.first().copied());
            assert_eq!(ix.last(s), m.last().copied());
            assert!(ix.iter(s).eq(m.iter().copied()));
        }
    }

    #[test]
    fn keys_keep_pair_order() {
        let pairs = [
            (i32::MIN, 0),
            (-1, u32::MAX),
            (0, 0),
            (0, 1),
            (5, 0),
            (i32::MAX, 7),
        ];
        for w in pairs.windows(2) {
            assert!(key(w[0].0, w[0].1) < key(w[1].0, w[1].1));
        }
        for &(p, c) in &pairs {
            assert_eq!(unkey(key(p, c)), (p, c));
        }
    }

    /// Random inserts, removals, ranges and predecessor queries against std's BTreeSet, with
    /// trees deep enough for inner splits and merges.
    #[test]
    fn matches_btreeset() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let n_seq = 3;
        let mut ix = PosIndex::try_new(n_seq, 64).unwrap();
        let mut model = vec![BTreeSet::new(); n_seq];
        for round in 0..6 {
            // Grow (appends and random inserts), then shrink (random and range removals).
            let grow = [40_000, 3_000, 70_000, 500, 20_000, 90_000][round];
            for _ in 0..grow {
                let s = rng.gen_range(0..n_seq);
                let (p, c) = if rng.gen_bool(0.5) {
                    (
                        model[s].last().map_or(0, |e: &(i32, u32)| e.0 + 1),
                        rng.gen(),
                    )
                } else {
                    (rng.gen_range(-50..100_000), rng.gen_range(0..4))
                };
                assert_eq!(ix.insert(s, p, c), model[s].insert((p, c)));
            }
            same(&ix, &model);
            for _ in 0..200 {
                let s = rng.gen_range(0..n_seq);
                let (p0, p1) = (rng.gen_range(-60..110_000), rng.gen_range(-60..110_000));
                let got: Vec<_> = ix.range(s, p0, p1).collect();
                let want: Vec<_> = if p0 < p1 {
                    model[s].range((p0, 0)..(p1, 0)).copied().collect()
                } else {
                    Vec::new()
                };
                assert_eq!(got, want);
                let back: Vec<_> = ix.range(s, p0, p1).rev().collect();
                assert!(back.iter().rev().eq(want.iter()));
                let c = rng.gen_range(0..5);
                assert_eq!(
                    ix.pred_le(s, p0, c),
                    model[s].range(..=(p0, c)).next_back().copied()
                );
                let probe = (p0, c);
                assert_eq!(ix.contains(s, p0, c), model[s].contains(&probe));
            }
            let shrink = if round % 2 == 0 { 0.6 } else { 1.0 };
            for (s, m) in model.iter_mut().enumerate() {
                let all: Vec<_> = m.iter().copied().collect();
                for (j, &(p, c)) in all.iter().enumerate() {
                    let cut = (j as f64) < all.len() as f64 * shrink;
                    if cut && (rng.gen_bool(0.7) || round == 5) {
                        assert!(ix.remove(s, p, c));
                        m.remove(&(p, c));
                    }
                }
                assert!(!ix.remove(s, -1000, 0));
            }
            same(&ix, &model);
        }
        // Empty every tree, then everything is back on the free lists.
        for (s, m) in model.iter_mut().enumerate() {
            for &(p, c) in m.iter() {
                assert!(ix.remove(s, p, c));
            }
            m.clear();
        }
        same(&ix, &model);
        let (nl, ni) = (ix.leaves.len(), ix.inners.len());
        let mut n = 0;
        let mut f = ix.free_leaf;
        while f != NIL {
            n += 1;
            f = ix.leaves[f as usize].next;
        }
        assert_eq!(n, nl);
        let mut n = 0;
        let mut f = ix.free_inner;
        while f != NIL {
            n += 1;
            f = ix.inners[f as usize].kids[0];
        }
        assert_eq!(n, ni);
    }

    /// Appends fill leaves completely, and an insert/remove cycle at the end of a full tree
    /// touches only pooled nodes.
    #[test]
    fn appends_and_rollbacks_reuse_nodes() {
        let mut ix = PosIndex::try_new(2, 4096).unwrap();
        let cap = (ix.leaves.capacity(), ix.inners.capacity());
        for p in 0..(LCAP as i32 * 40) {
            ix.insert(0, p, p as u32);
        }
        ix.check().unwrap();
        assert_eq!(ix.leaves.len(), 40);
        for round in 0..1000 {
            let p = LCAP as i32 * 40 + round;
            ix.insert(0, p, 9);
            ix.insert(1, p, 9);
            ix.remove(0, p, 9);
            ix.insert(0, p, 9);
        }
        ix.check().unwrap();
        assert_eq!((ix.leaves.capacity(), ix.inners.capacity()), cap);
    }
}
