//! Inode numbers for tree nodes.
//!
//! The kernel names files by inode number; the tree names them by [`Node`] value. An
//! inode number is derived from a hash of the node, so the same file gets the same number
//! in every mount (backups, `rsync` and `make` compare them), with linear probing on the
//! rare collision. The kernel's lookup count decides when a number may be forgotten.

use super::Node;
use std::collections::HashMap;
use std::sync::RwLock;

/// The root directory's inode number, fixed by FUSE.
pub const ROOT_INO: u64 = 1;

#[derive(Debug, Default)]
struct Table {
    by_ino: HashMap<u64, (Node, u64)>,
    by_node: HashMap<Node, u64>,
    /// What an inode of a revision stands for (see `Tree::stamp`), when known.
    stamps: HashMap<u64, u64>,
}

/// The two-way map between inode numbers and nodes, with kernel lookup counts.
#[derive(Debug)]
pub struct Inodes {
    table: RwLock<Table>,
}

impl Default for Inodes {
    fn default() -> Self {
        Self::new()
    }
}

impl Inodes {
    pub fn new() -> Inodes {
        let mut t = Table::default();
        t.by_ino.insert(ROOT_INO, (Node::Root, 1));
        t.by_node.insert(Node::Root, ROOT_INO);
        Inodes {
            table: RwLock::new(t),
        }
    }

    /// The node behind `ino`, if the kernel still knows it.
    pub fn node(&self, ino: u64) -> Option<Node> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        t.by_ino.get(&ino).map(|(n, _)| n.clone())
    }

    /// The inode number of `node` without counting a lookup (for `readdir`).
    pub fn peek(&self, node: &Node) -> u64 {
        {
            let t = self.table.read().unwrap_or_else(|e| e.into_inner());
            if let Some(&ino) = t.by_node.get(node) {
                return ino;
            }
        }
        stable_ino(node)
    }

    /// The inode number of `node`, counting one kernel lookup (an entry reply).
    pub fn remember(&self, node: &Node) -> u64 {
        self.remember_as(node, None)
    }

    /// [`Inodes::remember`] for a node that stands for `stamp` (see `Tree::stamp`):
    /// when its inode stood for another, `node` gets a new number (the old one stays
    /// with the kernel's handles on it, as a detached node's does).
    pub fn remember_as(&self, node: &Node, stamp: Option<u64>) -> u64 {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if let (Some(stamp), Some(&ino)) = (stamp, t.by_node.get(node))
            && t.stamps.get(&ino).is_some_and(|&was| was != stamp)
        {
            t.by_node.remove(node);
        }
        let ino = Self::remember_in(&mut t, node);
        if let Some(stamp) = stamp {
            t.stamps.insert(ino, stamp);
        }
        ino
    }

    /// What `ino` stands for, when recorded (see [`Inodes::remember_as`]).
    pub fn stamp(&self, ino: u64) -> Option<u64> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        t.stamps.get(&ino).copied()
    }

    fn remember_in(t: &mut Table, node: &Node) -> u64 {
        if let Some(&ino) = t.by_node.get(node) {
            if let Some(e) = t.by_ino.get_mut(&ino) {
                e.1 += 1;
            }
            return ino;
        }
        let mut ino = stable_ino(node);
        while t.by_ino.contains_key(&ino) {
            ino = next_candidate(ino);
        }
        t.by_ino.insert(ino, (node.clone(), 1));
        t.by_node.insert(node.clone(), ino);
        ino
    }

    /// The kernel dropped `n` lookups of `ino`; forgets it at zero (never the root).
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let gone = match t.by_ino.get_mut(&ino) {
            Some(e) => {
                e.1 = e.1.saturating_sub(n);
                e.1 == 0
            }
            None => false,
        };
        if gone {
            t.stamps.remove(&ino);
        }
        if gone
            && let Some((node, _)) = t.by_ino.remove(&ino)
            && t.by_node.get(&node) == Some(&ino)
        {
            t.by_node.remove(&node);
        }
    }

    /// `from` moved to `to` (a rename): the kernel moved the inode with the name, so
    /// that inode, and every inode of a node below `from`, now stands for the node at
    /// the new place (see [`Node::rebased`]).
    pub fn rebind(&self, from: &Node, to: &Node) {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let moved: Vec<(u64, Node, Node)> = t
            .by_ino
            .iter()
            .filter_map(|(&ino, (node, _))| {
                node.rebased(from, to).map(|new| (ino, node.clone(), new))
            })
            .collect();
        for (ino, old, new) in moved {
            if t.by_node.get(&old) == Some(&ino) {
                t.by_node.remove(&old);
            }
            if let Some(e) = t.by_ino.get_mut(&ino) {
                e.0 = new.clone();
            }
            t.by_node.insert(new, ino);
        }
    }

    /// `node` and everything below it are gone: their inode numbers stay with them for
    /// as long as the kernel holds them (an open file, a shell's working directory),
    /// and a new object at the same place gets a number of its own.
    pub fn detach(&self, node: &Node) {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.by_node.retain(|n, _| !within(n, node));
    }

    /// Number of inodes the kernel holds (for tests and statistics).
    pub fn len(&self) -> usize {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_ino
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `node` is `ancestor` or below it.
fn within(node: &Node, ancestor: &Node) -> bool {
    let mut n = Some(node.clone());
    while let Some(cur) = n {
        if &cur == ancestor {
            return true;
        }
        n = crate::tree::parent(&cur);
    }
    false
}

/// A hash of the node, kept away from the reserved numbers 0 and 1.
fn stable_ino(node: &Node) -> u64 {
    if *node == Node::Root {
        return ROOT_INO;
    }
    // FNV-1a (64 bits) of the node's kind and path: a specified function, so numbers
    // stay the same in every process, build and toolchain.
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let kind: &[u8] = match node {
        Node::Root => b"root",
        Node::Repo { .. } => b"repo",
        Node::Image { .. } => b"image",
        Node::Revision { .. } => b"revision",
        Node::Latest { .. } => b"latest",
        Node::File { .. } => b"file",
        Node::Import { .. } => b"import",
    };
    let path = crate::tree::display(node);
    let v = kind
        .iter()
        .chain(b"\0")
        .chain(path.as_bytes())
        .fold(FNV_OFFSET, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
        })
        & 0x7fff_ffff_ffff_ffff;
    if v <= ROOT_INO { v + 2 } else { v }
}

fn next_candidate(ino: u64) -> u64 {
    let n = ino.wrapping_add(1) & 0x7fff_ffff_ffff_ffff;
    if n <= ROOT_INO { 2 } else { n }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str) -> Node {
        Node::Image {
            repo: "user".into(),
            image: name.into(),
        }
    }

    #[test]
    fn the_same_node_gets_the_same_number_in_every_table() {
        let a = Inodes::new();
        let b = Inodes::new();
        let n = image("centos");
        assert_eq!(a.remember(&n), b.remember(&n));
        // The specified hash: FNV-1a of "image\0user/centos", top bit cleared.
        assert_eq!(a.peek(&n), stable_ino(&n));
        assert_eq!(stable_ino(&n), 0x385b_ccdf_4e56_9542);
        assert_eq!(a.peek(&n), a.remember(&n));
        assert_ne!(a.remember(&n), ROOT_INO);
    }

    #[test]
    fn a_node_is_forgotten_when_its_lookups_are() {
        let t = Inodes::new();
        let n = image("a");
        let ino = t.remember(&n);
        t.remember(&n);
        t.forget(ino, 1);
        assert_eq!(t.node(ino), Some(n.clone()));
        t.forget(ino, 1);
        assert_eq!(t.node(ino), None);
        t.forget(ROOT_INO, 10);
        assert_eq!(t.node(ROOT_INO), Some(Node::Root));
    }

    #[test]
    fn a_renamed_image_keeps_its_inodes_and_so_does_what_it_holds() {
        let t = Inodes::new();
        let (old, new) = (image("old"), image("new"));
        let rev = Node::Revision {
            repo: "user".into(),
            image: "old".into(),
            rev: 0,
        };
        let (ino, rev_ino) = (t.remember(&old), t.remember(&rev));
        t.rebind(&old, &new);
        assert_eq!(t.node(ino), Some(new.clone()));
        assert_eq!(t.peek(&new), ino);
        let moved = Node::Revision {
            repo: "user".into(),
            image: "new".into(),
            rev: 0,
        };
        assert_eq!(t.node(rev_ino), Some(moved));
        // The old name is free: looked up again, it is a new object.
        assert_ne!(t.remember(&old), ino);
    }
}
