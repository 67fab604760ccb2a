//! Inode numbers for tree nodes.
//!
//! The kernel names files by inode number; the tree names them by [`Node`] value. An
//! inode number is derived from a hash of the node, so the same file gets the same number
//! in every mount (backups, `rsync` and `make` compare them), with linear probing on the
//! rare collision. The kernel's lookup count decides when a number may be forgotten.

use crate::tree::Node;
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::RwLock;

/// The root directory's inode number, fixed by FUSE.
pub const ROOT_INO: u64 = 1;

#[derive(Debug, Default)]
struct Table {
    by_ino: HashMap<u64, (Node, u64)>,
    by_node: HashMap<Node, u64>,
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
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
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
        if gone && let Some((node, _)) = t.by_ino.remove(&ino) {
            t.by_node.remove(&node);
        }
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

/// A hash of the node, kept away from the reserved numbers 0 and 1.
fn stable_ino(node: &Node) -> u64 {
    if *node == Node::Root {
        return ROOT_INO;
    }
    // DefaultHasher::new() uses fixed keys, so numbers are the same in every process
    // built from this source.
    let mut h = DefaultHasher::new();
    node.hash(&mut h);
    let v = h.finish() & 0x7fff_ffff_ffff_ffff;
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
}
