//! Model-based test of the mount's session (`tree::session::Session`), without a mount.
//!
//! Random sequences of what processes do to a mount — create, reopen, write, dup, fork,
//! close, kill, rename, move to another repository, link, unlink, mkdir, rmdir, stat,
//! list — run against a session on real repositories in a temporary directory, beside two small reference models: the
//! namespace (images, their revisions, files being written) and the kernel (its cached
//! names with their inode numbers, the kind of each inode it holds, the descriptors of
//! each process). After every step every name the kernel caches must still resolve to
//! the inode it caches, an inode never changes kind, every open descriptor answers
//! `fstat`, and the repository lists exactly what the model expects.
//!
//! The cases are drawn from a fixed seed, so a run is reproducible;
//! `PCOCC_IMAGEFS_MODEL_CASES` sets how many (256 by default) and
//! `PCOCC_IMAGEFS_MODEL_SEED` another seed. A failure is shrunk to a shortest sequence;
//! such sequences are kept below as named regression tests.

use pcocc_imagefs::config::{Config, Origin, RepoConfig};
use pcocc_imagefs::tree::session::{Closing, Holders, NameCache, Session, SessionSettings};
use pcocc_imagefs::tree::{Caller, Node, NodeType, Tree};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestRng, TestRunner};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};

const REPO: &str = "r";
/// A second repository, that images move to whole.
const OTHER: &str = "q";
/// Names used at every level: two image names and a staging name.
const NAMES: [&str; 3] = ["a", "b", ".s"];
const PROCS: usize = 3;
const ROOT: u64 = 1;
const WRITE: usize = 4096;

/// One step of a sequence. Indices are taken modulo what exists at that moment, so
/// every sequence can run and shrinking keeps it meaningful.
#[derive(Clone, Debug)]
enum Op {
    /// `open(NAME, O_CREAT|O_EXCL|O_WRONLY)` by process `p`, in the repository (`dir`
    /// `None`) or in image directory `NAMES[dir]`.
    Create {
        p: usize,
        dir: Option<usize>,
        name: usize,
    },
    /// `write` of 4 KiB at the end of the file behind descriptor `fd` of `p`.
    Write {
        p: usize,
        fd: usize,
    },
    /// `open(NAME, O_WRONLY)` by `p` of a file being written (its writer reopening it,
    /// as `qemu-img convert` does after creating it).
    Reopen {
        p: usize,
        dir: Option<usize>,
        name: usize,
    },
    Dup {
        p: usize,
        fd: usize,
    },
    /// `fork`: process `q` (holding nothing) gets copies of `p`'s descriptors.
    Fork {
        p: usize,
        q: usize,
    },
    Close {
        p: usize,
        fd: usize,
    },
    /// A close whose holders cannot be told (`/proc` does not answer in time): the file
    /// is taken as still held, and its import waits for the `release`.
    CloseUnsure {
        p: usize,
        fd: usize,
    },
    /// `p` is killed by a signal: the kernel closes its descriptors.
    Kill {
        p: usize,
    },
    /// `rename` of `NAMES[from]` to `NAMES[to]` in the repository.
    Rename {
        from: usize,
        to: usize,
    },
    /// `mv REPO/NAME OTHER/`: the whole image moves to the other repository.
    MoveAcross {
        image: usize,
    },
    /// `ln IMAGE/@LAST/disk.qcow2 REPO/NAME`.
    Link {
        src: usize,
        to: usize,
    },
    Unlink {
        dir: Option<usize>,
        name: usize,
    },
    Mkdir {
        name: usize,
    },
    /// `rmdir IMAGE/@LAST`: deletes the last revision.
    RmRev {
        image: usize,
    },
    /// `rmdir IMAGE`: deletes the image.
    RmImage {
        image: usize,
    },
    Stat {
        dir: Option<usize>,
        name: usize,
    },
    List {
        dir: Option<usize>,
    },
    /// Memory pressure: the kernel drops every cached name and forgets every inode no
    /// open file holds.
    Evict,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PROCS;
    let n = 0..NAMES.len();
    let dir = proptest::option::of(0..2usize);
    let fd = 0..4usize;
    prop_oneof![
        4 => (p.clone(), dir.clone(), n.clone()).prop_map(|(p, dir, name)| Op::Create { p, dir, name }),
        4 => (p.clone(), fd.clone()).prop_map(|(p, fd)| Op::Write { p, fd }),
        1 => (p.clone(), fd.clone()).prop_map(|(p, fd)| Op::Dup { p, fd }),
        2 => (p.clone(), dir.clone(), n.clone()).prop_map(|(p, dir, name)| Op::Reopen { p, dir, name }),
        1 => (p.clone(), p.clone()).prop_map(|(p, q)| Op::Fork { p, q }),
        4 => (p.clone(), fd.clone()).prop_map(|(p, fd)| Op::Close { p, fd }),
        1 => (p.clone(), fd.clone()).prop_map(|(p, fd)| Op::CloseUnsure { p, fd }),
        1 => p.clone().prop_map(|p| Op::Kill { p }),
        2 => (n.clone(), n.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (0..2usize, n.clone()).prop_map(|(src, to)| Op::Link { src, to }),
        1 => (0..2usize).prop_map(|image| Op::MoveAcross { image }),
        1 => (dir.clone(), n.clone()).prop_map(|(dir, name)| Op::Unlink { dir, name }),
        1 => n.clone().prop_map(|name| Op::Mkdir { name }),
        1 => (0..2usize).prop_map(|image| Op::RmRev { image }),
        1 => (0..2usize).prop_map(|image| Op::RmImage { image }),
        2 => (dir.clone(), n.clone()).prop_map(|(dir, name)| Op::Stat { dir, name }),
        2 => dir.prop_map(|dir| Op::List { dir }),
        1 => Just(Op::Evict),
    ]
}

/// What the next close is, as `/proc` would tell it: set by the test before each
/// `flush`.
#[derive(Default, Clone)]
struct ModelHolders(Arc<Mutex<Closing>>);

impl Holders for ModelHolders {
    fn closing(&self, _ino: u64, _pid: u32) -> Closing {
        *self.0.lock().unwrap()
    }
}

/// The kernel's name cache receives invalidations after the operation that caused
/// them has replied (they wait for the directory lock the operation holds).
#[derive(Default, Clone)]
struct Invalidations(Arc<Mutex<Vec<(u64, String)>>>);

impl NameCache for Invalidations {
    fn invalidate(&self, parent: u64, name: &str) {
        self.0.lock().unwrap().push((parent, name.to_string()));
    }
}

/// What the repository holds, as the model expects it and as listings show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Namespace {
    /// Image → its revisions (empty: a directory made by mkdir, or whose revisions were
    /// all deleted).
    images: BTreeMap<String, BTreeSet<u64>>,
    /// Files being written that their writer sees: (image directory or `None`, name).
    files: BTreeSet<(Option<String>, String)>,
    /// The images of the other repository with their revisions.
    other: BTreeMap<String, BTreeSet<u64>>,
}

/// A file being written, as the model knows it.
#[derive(Clone, Debug)]
struct File {
    dir: Option<String>,
    name: String,
    size: u64,
    /// Still being written (its name visible); false once published, failed or dropped.
    writing: bool,
}

/// An open file description: its handle and the file it is (`None` for a file the
/// model does not follow).
#[derive(Clone, Debug)]
struct Desc {
    fh: u64,
    ino: u64,
    file: usize,
    refs: usize,
}

/// The kernel: cached names (parent inode, name) → inode, and the kind of each inode it
/// holds with its lookup count.
#[derive(Default, Debug)]
struct Kernel {
    dentries: HashMap<(u64, String), u64>,
    inodes: HashMap<u64, (NodeType, u64)>,
}

struct World {
    _dir: tempfile::TempDir,
    session: Session,
    me: Caller,
    holders: ModelHolders,
    invalidations: Invalidations,
    kernel: Kernel,
    model: Namespace,
    files: Vec<File>,
    descs: Vec<Desc>,
    /// Each process's descriptor table: indices into `descs`.
    procs: Vec<Vec<usize>>,
    log: Vec<String>,
    /// Names published from inside an image directory: their writer may still see
    /// them for a moment (`install -m` sets the mode by name after close).
    published: BTreeSet<(Option<String>, String)>,
    /// Empty image directories made by mkdir (not left by the removal of the last
    /// revision, nor renamed since): a failed import into one takes it with it.
    made_by_mkdir: BTreeSet<String>,
}

/// The outcome the model expects of a step.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Ok,
    Err(i32),
    /// Either, and the model then takes the namespace as the repository shows it.
    Any,
}

fn errno_name(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            repos: [REPO, OTHER]
                .into_iter()
                .map(|name| RepoConfig {
                    name: name.into(),
                    path: dir.path().join(name),
                    origin: Origin::Default,
                })
                .collect(),
        };
        let tree = Arc::new(Tree::new(&config).unwrap());
        let holders = ModelHolders::default();
        let invalidations = Invalidations::default();
        let session = Session::new(
            tree,
            SessionSettings::default(),
            Box::new(holders.clone()),
            Box::new(invalidations.clone()),
        );
        let mut kernel = Kernel::default();
        kernel.inodes.insert(ROOT, (NodeType::Directory, 1));
        World {
            _dir: dir,
            session,
            me: Caller::current(),
            holders,
            invalidations,
            kernel,
            model: Namespace::default(),
            files: Vec::new(),
            descs: Vec::new(),
            procs: vec![Vec::new(); PROCS],
            log: Vec::new(),
            published: BTreeSet::new(),
            made_by_mkdir: BTreeSet::new(),
        }
    }

    // ----- the kernel -----

    /// The kernel takes an entry reply: counts a lookup, checks the inode keeps its kind,
    /// caches the name when its lifetime allows.
    fn take_entry(&mut self, parent: u64, name: &str, ino: u64, kind: NodeType, ttl_zero: bool) {
        let e = self.kernel.inodes.entry(ino).or_insert((kind, 0));
        assert_eq!(
            e.0, kind,
            "inode {ino} ({parent}/{name}) changed kind from {:?} to {kind:?}",
            e.0
        );
        e.1 += 1;
        if ttl_zero {
            self.kernel.dentries.remove(&(parent, name.to_string()));
        } else {
            self.kernel.dentries.insert((parent, name.to_string()), ino);
        }
    }

    /// Path resolution of one component: the cached name, or a lookup.
    fn resolve(&mut self, parent: u64, name: &str) -> Result<(u64, NodeType), i32> {
        if let Some(&ino) = self.kernel.dentries.get(&(parent, name.to_string())) {
            return Ok((ino, self.kernel.inodes[&ino].0));
        }
        match self.session.lookup(&self.me, parent, OsStr::new(name)) {
            Ok(e) => {
                self.take_entry(parent, name, e.ino, e.attr.kind, e.ttl.is_zero());
                Ok((e.ino, e.attr.kind))
            }
            Err(e) => Err(e.errno()),
        }
    }

    fn repo_ino(&mut self) -> u64 {
        self.resolve(ROOT, REPO).expect("the repository resolves").0
    }

    /// The directory a step works in: the repository, or image `NAMES[i]` in it.
    fn dir_ino(&mut self, dir: Option<usize>) -> Result<u64, i32> {
        let repo = self.repo_ino();
        match dir {
            None => Ok(repo),
            Some(i) => match self.resolve(repo, NAMES[i])? {
                (ino, NodeType::Directory) => Ok(ino),
                _ => Err(libc::ENOTDIR),
            },
        }
    }

    /// A directory was removed: the kernel drops the names cached below it.
    fn drop_below(&mut self, dir: u64) {
        let below: Vec<(u64, String)> = self
            .kernel
            .dentries
            .iter()
            .filter(|((p, _), _)| *p == dir)
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            if let Some(child) = self.kernel.dentries.remove(&k) {
                self.drop_below(child);
            }
        }
    }

    /// A rename of `from` (parent, name) to `to`, inode `ino`, succeeded: the kernel
    /// moves the cached name with its inode, replacing whatever `to` named.
    fn kernel_renamed(&mut self, from: (u64, &str), to: (u64, &str), ino: u64) {
        self.kernel.dentries.remove(&(to.0, to.1.to_string()));
        if self
            .kernel
            .dentries
            .remove(&(from.0, from.1.to_string()))
            .is_some()
        {
            self.kernel.dentries.insert((to.0, to.1.to_string()), ino);
        }
    }

    /// Invalidations sent during the last operation reach the kernel.
    fn deliver_invalidations(&mut self) {
        let sent: Vec<_> = std::mem::take(&mut *self.invalidations.0.lock().unwrap());
        for (parent, name) in sent {
            self.kernel.dentries.remove(&(parent, name));
        }
    }

    // ----- the model -----

    fn dir_name(dir: Option<usize>) -> Option<String> {
        dir.map(|i| NAMES[i].to_string())
    }

    /// Whether `name` exists in directory `dir` for the model.
    fn model_has(&self, dir: &Option<String>, name: &str) -> bool {
        let file = self.model.files.contains(&(dir.clone(), name.to_string()));
        match dir {
            None => file || self.model.images.contains_key(name),
            Some(_) => file,
        }
    }

    fn file_at(&self, dir: &Option<String>, name: &str) -> Option<usize> {
        self.files
            .iter()
            .rposition(|f| f.writing && &f.dir == dir && f.name == name)
    }

    /// Whether a file is being written into image directory `image`.
    fn writing_into(&self, image: &str) -> bool {
        self.files
            .iter()
            .any(|f| f.writing && f.dir.as_deref() == Some(image))
    }

    fn end_file(&mut self, f: usize) {
        let file = &mut self.files[f];
        if file.writing {
            file.writing = false;
            self.model
                .files
                .remove(&(file.dir.clone(), file.name.clone()));
        }
    }

    /// A file's last close publishes it, when it holds data: a new image, or the next
    /// revision of its image directory.
    fn publish(&mut self, f: usize) -> Expect {
        let file = self.files[f].clone();
        self.end_file(f);
        if file.dir.is_some() {
            self.published.insert((file.dir.clone(), file.name.clone()));
        }
        if file.size == 0 {
            // Not an image; an empty directory its writer made for it goes too.
            if let Some(image) = &file.dir
                && self.made_by_mkdir.contains(image)
                && self.model.images.get(image).is_some_and(|r| r.is_empty())
                && !self.writing_into(image)
            {
                self.model.images.remove(image);
                self.made_by_mkdir.remove(image);
            }
            return Expect::Err(libc::EINVAL);
        }
        match &file.dir {
            None => {
                if self
                    .model
                    .images
                    .get(&file.name)
                    .is_some_and(|r| !r.is_empty())
                {
                    return Expect::Any;
                }
                self.model
                    .images
                    .insert(file.name.clone(), BTreeSet::from([0]));
                Expect::Ok
            }
            Some(image) => match self.model.images.get_mut(image) {
                Some(revs) => {
                    self.made_by_mkdir.remove(image);
                    let next = revs.last().map_or(0, |r| r + 1);
                    revs.insert(next);
                    Expect::Ok
                }
                None => Expect::Any,
            },
        }
    }

    /// The namespace as the repository lists it.
    fn observe(&self) -> Namespace {
        let tree = self.session.tree();
        let repo = Node::Repo { repo: REPO.into() };
        let mut ns = Namespace::default();
        let other = Node::Repo { repo: OTHER.into() };
        for e in tree.readdir(&self.me, &other).unwrap() {
            let Node::Image { image, .. } = e.node else {
                panic!("unexpected entry {:?} in {OTHER}", e.node);
            };
            let dir = Node::Image {
                repo: OTHER.into(),
                image: image.clone(),
            };
            let revs = tree
                .readdir(&self.me, &dir)
                .unwrap()
                .into_iter()
                .filter_map(|c| match c.node {
                    Node::Revision { rev, .. } => Some(rev),
                    _ => None,
                })
                .collect();
            ns.other.insert(image, revs);
        }
        for e in tree.readdir(&self.me, &repo).unwrap() {
            match e.node {
                Node::Image { image, .. } => {
                    let dir = Node::Image {
                        repo: REPO.into(),
                        image: image.clone(),
                    };
                    let mut revs = BTreeSet::new();
                    for c in tree.readdir(&self.me, &dir).unwrap() {
                        match c.node {
                            Node::Revision { rev, .. } => {
                                revs.insert(rev);
                            }
                            Node::Import { name, .. } => {
                                ns.files.insert((Some(image.clone()), name));
                            }
                            _ => {}
                        }
                    }
                    ns.images.insert(image, revs);
                }
                Node::Import { name, .. } => {
                    ns.files.insert((None, name));
                }
                other => panic!("unexpected entry {other:?}"),
            }
        }
        ns
    }

    // ----- descriptors -----

    fn fd(&self, p: usize, fd: usize) -> Option<usize> {
        let t = &self.procs[p];
        (!t.is_empty()).then(|| t[fd % t.len()])
    }

    /// Whether any descriptor of any process refers to inode `ino`.
    fn held(&self, ino: u64) -> bool {
        self.procs
            .iter()
            .flatten()
            .any(|&d| self.descs[d].ino == ino)
    }

    /// Closes descriptor slot `slot` of `p`: one `flush`, and the `release` when it was
    /// the description's last reference. Returns what the model expects of the flush.
    fn close(
        &mut self,
        p: usize,
        slot: usize,
        killed: bool,
        unsure: bool,
    ) -> (Expect, Result<(), i32>) {
        let d = self.procs[p].remove(slot);
        let Desc { fh, ino, file, .. } = self.descs[d].clone();
        self.descs[d].refs -= 1;
        let held = unsure || self.held(ino);
        *self.holders.0.lock().unwrap() = Closing { killed, held };
        let f = self.files[file].clone();
        let staging = f.name.starts_with('.');
        let expect = if killed {
            self.end_file(file);
            Expect::Ok
        } else if !f.writing {
            Expect::Any
        } else if staging || held {
            Expect::Ok
        } else {
            self.publish(file)
        };
        let got = self
            .session
            .flush(fh, 1000 + p as u32)
            .map_err(|e| e.errno());
        if self.descs[d].refs == 0 {
            self.session.release(fh);
            // The last description of a file nothing holds: an unpublished file goes
            // (a staging file stays for its rename).
            let open = self.descs.iter().any(|x| x.refs > 0 && x.file == file);
            if !open && !staging && self.files[file].writing {
                // Published now if it can be; a failure reaches only the log.
                let _ = self.publish(file);
            }
            self.forget_ino(ino, 0);
        }
        (expect, got)
    }

    /// The kernel drops `n` lookups of `ino` (all of them for `n` 0) when no cached name
    /// and no open file holds it.
    fn forget_ino(&mut self, ino: u64, n: u64) {
        let pinned = self.kernel.dentries.values().any(|&i| i == ino)
            || self.descs.iter().any(|d| d.refs > 0 && d.ino == ino);
        if ino == ROOT || pinned {
            return;
        }
        if let Some((_, count)) = self.kernel.inodes.get(&ino).copied() {
            let n = if n == 0 { count } else { n.min(count) };
            self.session.forget(ino, n);
            if n == count {
                self.kernel.inodes.remove(&ino);
            } else if let Some(e) = self.kernel.inodes.get_mut(&ino) {
                e.1 -= n;
            }
        }
    }

    // ----- steps -----

    fn step(&mut self, op: &Op) {
        self.log.push(format!("{op:?}"));
        let (expect, got) = self.run(op);
        self.deliver_invalidations();
        match (&expect, &got) {
            (Expect::Any, _) | (Expect::Ok, Ok(())) => {}
            (Expect::Err(a), Err(b)) if a == b => {}
            _ => panic!(
                "{op:?}: expected {expect:?}, got {}\nsteps:\n{}",
                match got {
                    Ok(()) => "success".to_string(),
                    Err(e) => errno_name(e),
                },
                self.log.join("\n")
            ),
        }
        if expect == Expect::Any {
            let seen = self.observe();
            for f in self.files.iter_mut().filter(|f| f.writing) {
                f.writing = seen.files.contains(&(f.dir.clone(), f.name.clone()));
            }
            self.model = seen;
        }
        self.check();
    }

    fn run(&mut self, op: &Op) -> (Expect, Result<(), i32>) {
        let me = self.me.clone();
        match *op {
            Op::Create { p, dir, name } => {
                let Ok(parent) = self.dir_ino(dir) else {
                    let exists = dir.is_some_and(|i| self.model.images.contains_key(NAMES[i]));
                    return (
                        if exists { Expect::Ok } else { Expect::Any },
                        Err(libc::ENOENT),
                    );
                };
                let dname = Self::dir_name(dir);
                let name = NAMES[name];
                if self.resolve(parent, name).is_ok() {
                    // O_EXCL: the kernel answers by itself.
                    let e = if self.model_has(&dname, name) {
                        Expect::Err(libc::EEXIST)
                    } else {
                        Expect::Any
                    };
                    return (e, Err(libc::EEXIST));
                }
                let expect = if self.model_has(&dname, name) {
                    Expect::Any
                } else {
                    Expect::Ok
                };
                match self.session.create(&me, parent, OsStr::new(name), 0o644) {
                    Ok((entry, fh)) => {
                        self.take_entry(
                            parent,
                            name,
                            entry.ino,
                            entry.attr.kind,
                            entry.ttl.is_zero(),
                        );
                        self.files.push(File {
                            dir: dname.clone(),
                            name: name.to_string(),
                            size: 0,
                            writing: true,
                        });
                        self.model.files.insert((dname, name.to_string()));
                        self.descs.push(Desc {
                            fh,
                            ino: entry.ino,
                            file: self.files.len() - 1,
                            refs: 1,
                        });
                        self.procs[p].push(self.descs.len() - 1);
                        (expect, Ok(()))
                    }
                    Err(e) => (expect, Err(e.errno())),
                }
            }
            Op::Write { p, fd } => {
                let Some(d) = self.fd(p, fd) else {
                    return (Expect::Ok, Ok(()));
                };
                let Desc { fh, file, .. } = self.descs[d].clone();
                let f = self.files[file].clone();
                if f.size >= 2 * WRITE as u64 {
                    return (Expect::Ok, Ok(()));
                }
                let data = vec![0x5a; WRITE];
                let got = self.session.write(fh, &data, f.size).map(|_| ());
                let expect = if f.writing { Expect::Ok } else { Expect::Any };
                if got.is_ok() {
                    self.files[file].size += WRITE as u64;
                }
                (expect, got.map_err(|e| e.errno()))
            }
            Op::Reopen { p, dir, name } => {
                let dname = Self::dir_name(dir);
                let name = NAMES[name];
                let Some(file) = self.file_at(&dname, name) else {
                    return (Expect::Ok, Ok(()));
                };
                let parent = match self.dir_ino(dir) {
                    Ok(i) => i,
                    Err(e) => return (Expect::Ok, Err(e)),
                };
                let (ino, kind) = match self.resolve(parent, name) {
                    Ok(found) => found,
                    Err(e) => return (Expect::Ok, Err(e)),
                };
                assert_eq!(kind, NodeType::RegularFile, "{name}: a file being written");
                // One writer at a time: refused while a descriptor of it is open.
                let open = self.descs.iter().any(|d| d.refs > 0 && d.file == file);
                let expect = if open {
                    Expect::Err(libc::EEXIST)
                } else {
                    Expect::Ok
                };
                match self.session.open(&me, ino, libc::O_WRONLY) {
                    Ok(o) => {
                        self.descs.push(Desc {
                            fh: o.fh,
                            ino,
                            file,
                            refs: 1,
                        });
                        self.procs[p].push(self.descs.len() - 1);
                        (expect, Ok(()))
                    }
                    Err(e) => (expect, Err(e.errno())),
                }
            }
            Op::Dup { p, fd } => {
                if let Some(d) = self.fd(p, fd) {
                    self.descs[d].refs += 1;
                    self.procs[p].push(d);
                }
                (Expect::Ok, Ok(()))
            }
            Op::Fork { p, q } => {
                if p != q && self.procs[q].is_empty() {
                    let table = self.procs[p].clone();
                    for &d in &table {
                        self.descs[d].refs += 1;
                    }
                    self.procs[q] = table;
                }
                (Expect::Ok, Ok(()))
            }
            Op::Close { p, fd } => {
                if self.procs[p].is_empty() {
                    return (Expect::Ok, Ok(()));
                }
                let slot = fd % self.procs[p].len();
                self.close(p, slot, false, false)
            }
            Op::CloseUnsure { p, fd } => {
                if self.procs[p].is_empty() {
                    return (Expect::Ok, Ok(()));
                }
                let slot = fd % self.procs[p].len();
                self.close(p, slot, false, true)
            }
            Op::Kill { p } => {
                let mut all = (Expect::Ok, Ok(()));
                while !self.procs[p].is_empty() {
                    let (e, got) = self.close(p, 0, true, false);
                    if got.is_err() || e != Expect::Ok {
                        all = (e, got);
                    }
                }
                all
            }
            Op::Rename { from, to } => {
                let repo = self.repo_ino();
                let (from, to) = (NAMES[from], NAMES[to]);
                if from == to {
                    // The kernel renames a name onto itself without asking.
                    return (Expect::Ok, Ok(()));
                }
                let Ok((src, _)) = self.resolve(repo, from) else {
                    let e = if self.model_has(&None, from) {
                        Expect::Any
                    } else {
                        Expect::Ok
                    };
                    return (e, Ok(()));
                };
                let _ = self.resolve(repo, to);
                let expect = self.expect_rename(from, to);
                let got = self
                    .session
                    .rename(&me, repo, OsStr::new(from), repo, OsStr::new(to), 0)
                    .map_err(|e| e.errno());
                if got.is_ok() {
                    // A renamed directory no longer counts as made by mkdir.
                    self.made_by_mkdir.remove(from);
                    self.made_by_mkdir.remove(to);
                    self.kernel_renamed((repo, from), (repo, to), src);
                }
                (expect, got)
            }
            Op::MoveAcross { image } => {
                let repo = self.repo_ino();
                let other = self.resolve(ROOT, OTHER).expect("the other repository").0;
                let name = NAMES[image];
                let Ok((src, NodeType::Directory)) = self.resolve(repo, name) else {
                    return (Expect::Ok, Ok(()));
                };
                let target_taken = self.resolve(other, name).is_ok();
                let writing_into = self.writing_into(name);
                let revs = self.model.images.get(name).cloned().unwrap_or_default();
                let expect = if writing_into {
                    Expect::Err(libc::EBUSY)
                } else if target_taken || revs.is_empty() {
                    Expect::Any
                } else {
                    self.model.images.remove(name);
                    self.made_by_mkdir.remove(name);
                    self.model.other.insert(name.to_string(), revs);
                    Expect::Ok
                };
                let got = self
                    .session
                    .rename(&me, repo, OsStr::new(name), other, OsStr::new(name), 0)
                    .map_err(|e| e.errno());
                if got.is_ok() {
                    self.kernel_renamed((repo, name), (other, name), src);
                }
                (expect, got)
            }
            Op::Link { src, to } => {
                let image = NAMES[src];
                let Some(last) = self.model.images.get(image).and_then(|r| r.last().copied())
                else {
                    return (Expect::Ok, Ok(()));
                };
                let repo = self.repo_ino();
                let file = (|| {
                    let (i, _) = self.resolve(repo, image)?;
                    let (r, _) = self.resolve(i, &format!("@{last}"))?;
                    self.resolve(r, "disk.qcow2")
                })();
                let Ok((file, _)) = file else {
                    return (Expect::Err(0), Err(libc::ENOENT));
                };
                let to = NAMES[to];
                if self.resolve(repo, to).is_ok() {
                    // The kernel refuses link onto an existing name.
                    return (Expect::Ok, Ok(()));
                }
                let expect = if self.model_has(&None, to) {
                    Expect::Any
                } else {
                    self.model
                        .images
                        .insert(to.to_string(), BTreeSet::from([0]));
                    Expect::Ok
                };
                match self.session.link(&me, file, repo, OsStr::new(to)) {
                    Ok(e) => {
                        self.take_entry(repo, to, e.ino, e.attr.kind, e.ttl.is_zero());
                        (expect, Ok(()))
                    }
                    Err(e) => (expect, Err(e.errno())),
                }
            }
            Op::Unlink { dir, name } => {
                let Ok(parent) = self.dir_ino(dir) else {
                    return (Expect::Ok, Ok(()));
                };
                let dname = Self::dir_name(dir);
                let name = NAMES[name];
                let Ok((_, kind)) = self.resolve(parent, name) else {
                    return (Expect::Ok, Ok(()));
                };
                if kind == NodeType::Directory {
                    return (Expect::Ok, Ok(()));
                }
                let expect = match self.file_at(&dname, name) {
                    Some(f) => {
                        self.end_file(f);
                        Expect::Ok
                    }
                    None => Expect::Any,
                };
                let got = self
                    .session
                    .unlink(&me, parent, OsStr::new(name))
                    .map_err(|e| e.errno());
                if got.is_ok() {
                    self.kernel.dentries.remove(&(parent, name.to_string()));
                }
                (expect, got)
            }
            Op::Mkdir { name } => {
                let repo = self.repo_ino();
                let name = NAMES[name];
                if self.resolve(repo, name).is_ok() {
                    return (Expect::Ok, Ok(()));
                }
                let expect = if self.model_has(&None, name) {
                    Expect::Any
                } else {
                    self.model.images.insert(name.to_string(), BTreeSet::new());
                    self.made_by_mkdir.insert(name.to_string());
                    Expect::Ok
                };
                match self.session.mkdir(&me, repo, OsStr::new(name)) {
                    Ok(e) => {
                        self.take_entry(repo, name, e.ino, e.attr.kind, e.ttl.is_zero());
                        (expect, Ok(()))
                    }
                    Err(e) => (expect, Err(e.errno())),
                }
            }
            Op::RmRev { image } => {
                let image = NAMES[image];
                let Some(last) = self.model.images.get(image).and_then(|r| r.last().copied())
                else {
                    return (Expect::Ok, Ok(()));
                };
                let Ok(dir) = self.dir_ino(Some(NAMES.iter().position(|n| *n == image).unwrap()))
                else {
                    return (Expect::Err(0), Err(libc::ENOENT));
                };
                let name = format!("@{last}");
                if self.resolve(dir, &name).is_err() {
                    return (Expect::Err(0), Err(libc::ENOENT));
                }
                if let Some(revs) = self.model.images.get_mut(image) {
                    revs.remove(&last);
                }
                let got = self
                    .session
                    .rmdir(&me, dir, OsStr::new(&name))
                    .map_err(|e| e.errno());
                if got.is_ok()
                    && let Some(gone) = self.kernel.dentries.remove(&(dir, name))
                {
                    self.drop_below(gone);
                }
                (Expect::Ok, got)
            }
            Op::RmImage { image } => {
                let repo = self.repo_ino();
                let image = NAMES[image];
                let Ok((_, NodeType::Directory)) = self.resolve(repo, image) else {
                    return (Expect::Ok, Ok(()));
                };
                let expect = if self.writing_into(image) {
                    Expect::Err(libc::EBUSY)
                } else if self.model.images.remove(image).is_some() {
                    Expect::Ok
                } else {
                    Expect::Any
                };
                let got = self
                    .session
                    .rmdir(&me, repo, OsStr::new(image))
                    .map_err(|e| e.errno());
                if got.is_ok() {
                    self.made_by_mkdir.remove(image);
                    if let Some(gone) = self.kernel.dentries.remove(&(repo, image.to_string())) {
                        self.drop_below(gone);
                    }
                }
                (expect, got)
            }
            Op::Stat { dir, name } => {
                let dname = Self::dir_name(dir);
                let name = NAMES[name];
                let Ok(parent) = self.dir_ino(dir) else {
                    let exists = dir.is_some_and(|i| self.model.images.contains_key(NAMES[i]));
                    return (
                        if exists {
                            Expect::Ok
                        } else {
                            Expect::Err(libc::ENOENT)
                        },
                        Err(libc::ENOENT),
                    );
                };
                let expect = if self.model_has(&dname, name) {
                    Expect::Ok
                } else if self.published.contains(&(dname.clone(), name.to_string())) {
                    Expect::Any
                } else {
                    Expect::Err(libc::ENOENT)
                };
                let got = self.resolve(parent, name).and_then(|(ino, kind)| {
                    let (attr, _) = self
                        .session
                        .getattr(&me, ino, None)
                        .map_err(|e| e.errno())?;
                    assert_eq!(attr.kind, kind, "stat of {name}: kind of inode {ino}");
                    Ok(())
                });
                (expect, got)
            }
            Op::List { dir } => {
                let Ok(ino) = self.dir_ino(dir) else {
                    return (Expect::Ok, Ok(()));
                };
                let fh = self.session.opendir(ino);
                let mut seen = Vec::new();
                let r = self.session.readdirplus(&me, ino, fh, 0, |e| {
                    seen.push(e.clone());
                    false
                });
                self.session.releasedir(fh);
                r.unwrap();
                let mut names = BTreeSet::new();
                for e in seen {
                    let name = e.listed.name.clone();
                    if name == "." || name == ".." {
                        continue;
                    }
                    // Each entry is a lookup the kernel takes, and the lookup of the
                    // name must agree with it.
                    self.take_entry(
                        ino,
                        &name,
                        e.entry.ino,
                        e.entry.attr.kind,
                        e.entry.ttl.is_zero(),
                    );
                    names.insert(name);
                }
                let dname = Self::dir_name(dir);
                let mut want: BTreeSet<String> = self
                    .model
                    .files
                    .iter()
                    .filter(|(d, _)| *d == dname)
                    .map(|(_, n)| n.clone())
                    .collect();
                match &dname {
                    None => want.extend(self.model.images.keys().cloned()),
                    Some(image) => {
                        if let Some(revs) = self.model.images.get(image) {
                            want.extend(revs.iter().map(|r| format!("@{r}")));
                            if !revs.is_empty() {
                                want.insert("latest".into());
                            }
                        }
                    }
                }
                assert_eq!(
                    names,
                    want,
                    "listing of {dname:?}\nsteps:\n{}",
                    self.log.join("\n")
                );
                (Expect::Ok, Ok(()))
            }
            Op::Evict => {
                self.kernel.dentries.clear();
                let inos: Vec<u64> = self.kernel.inodes.keys().copied().collect();
                for ino in inos {
                    self.forget_ino(ino, 0);
                }
                (Expect::Ok, Ok(()))
            }
        }
    }

    fn expect_rename(&mut self, from: &str, to: &str) -> Expect {
        if from == to {
            return Expect::Any;
        }
        if let Some(f) = self.file_at(&None, from) {
            if !from.starts_with('.') {
                return Expect::Err(libc::EPERM);
            }
            if self.model.files.contains(&(None, to.to_string())) {
                return Expect::Err(libc::EEXIST);
            }
            if to.starts_with('.') || self.model_has(&None, to) {
                return Expect::Any;
            }
            if self.files[f].size == 0 {
                // Not an image: the rename fails and the file stays where it was.
                return Expect::Err(libc::EINVAL);
            }
            self.files[f].name = to.to_string();
            self.model.files.remove(&(None, from.to_string()));
            self.model.files.insert((None, to.to_string()));
            return self.publish(f);
        }
        if self.model.images.contains_key(from)
            && self.model.files.contains(&(None, to.to_string()))
        {
            return Expect::Err(libc::ENOTDIR);
        }
        if self
            .model
            .files
            .iter()
            .any(|(d, _)| d.as_deref() == Some(from))
        {
            // A file is being written into it.
            return Expect::Err(libc::EBUSY);
        }
        match self.model.images.get(from).cloned() {
            Some(revs) if !self.model_has(&None, to) => {
                self.model.images.remove(from);
                self.model.images.insert(to.to_string(), revs);
                for f in self.files.iter_mut() {
                    if f.dir.as_deref() == Some(from) {
                        f.dir = Some(to.to_string());
                    }
                }
                let moved: Vec<_> = self
                    .model
                    .files
                    .iter()
                    .filter(|(d, _)| d.as_deref() == Some(from))
                    .cloned()
                    .collect();
                for (d, n) in moved {
                    self.model.files.remove(&(d, n.clone()));
                    self.model.files.insert((Some(to.to_string()), n));
                }
                Expect::Ok
            }
            _ => Expect::Any,
        }
    }

    /// Every name the kernel caches resolves to the inode it caches, and every open
    /// descriptor answers `fstat`; the repository lists what the model expects.
    fn check(&mut self) {
        let cached: Vec<((u64, String), u64)> = self
            .kernel
            .dentries
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for ((parent, name), ino) in cached {
            match self.session.lookup(&self.me, parent, OsStr::new(&name)) {
                Ok(e) => {
                    self.session.forget(e.ino, 1);
                    assert_eq!(
                        e.ino,
                        ino,
                        "the kernel caches {parent}/{name} as inode {ino}, a lookup says {}\nsteps:\n{}",
                        e.ino,
                        self.log.join("\n")
                    );
                    assert_eq!(e.attr.kind, self.kernel.inodes[&ino].0, "kind of {name}");
                }
                Err(e) => panic!(
                    "the kernel caches {parent}/{name} as inode {ino}, a lookup fails: {e}\nsteps:\n{}",
                    self.log.join("\n")
                ),
            }
        }
        for d in self.descs.iter().filter(|d| d.refs > 0) {
            if let Err(e) = self.session.getattr(&self.me, d.ino, Some(d.fh)) {
                panic!(
                    "fstat of an open file (inode {}) fails: {e}\nsteps:\n{}",
                    d.ino,
                    self.log.join("\n")
                );
            }
        }
        assert_eq!(
            self.observe(),
            self.model,
            "the repository and the model differ\nsteps:\n{}",
            self.log.join("\n")
        );
    }
}

fn run_sequence(ops: &[Op]) {
    let mut w = World::new();
    for op in ops {
        w.step(op);
    }
    // Every process exits: nothing may be left half-done.
    for p in 0..PROCS {
        while !w.procs[p].is_empty() {
            w.step(&Op::Close { p, fd: 0 });
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_sequences_keep_the_kernel_and_the_repository_in_agreement() {
    let cases = env_u64("PCOCC_IMAGEFS_MODEL_CASES").unwrap_or(256) as u32;
    let seed = env_u64("PCOCC_IMAGEFS_MODEL_SEED").unwrap_or(0x5eed_1e55);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = PtConfig {
        cases,
        failure_persistence: None,
        ..PtConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        run_sequence(&ops);
        Ok(())
    });
    if let Err(e) = result {
        panic!("seed {seed:#x}: {e}");
    }
}

// ----- regression sequences found by the random test -----

// ----- sequences the random test found, shrunk; each failed once -----

use Op::*;

#[test]
fn a_new_file_of_the_name_of_an_unlinked_open_one_gets_its_own_inode_and_publishes() {
    run_sequence(&[
        Create {
            p: 0,
            dir: None,
            name: 1,
        },
        Unlink { dir: None, name: 1 },
        Create {
            p: 2,
            dir: None,
            name: 1,
        },
        Write { p: 2, fd: 0 },
        Close { p: 2, fd: 0 },
    ]);
}

#[test]
fn an_open_file_answers_fstat_after_its_name_is_gone() {
    run_sequence(&[
        Create {
            p: 2,
            dir: None,
            name: 2,
        },
        Write { p: 2, fd: 0 },
        Unlink { dir: None, name: 2 },
        Create {
            p: 0,
            dir: None,
            name: 0,
        },
        Kill { p: 0 },
    ]);
}

#[test]
fn an_image_a_file_is_being_written_into_cannot_be_renamed() {
    run_sequence(&[
        Mkdir { name: 0 },
        Create {
            p: 0,
            dir: Some(0),
            name: 0,
        },
        Rename { from: 0, to: 1 },
    ]);
}

#[test]
fn an_image_a_file_is_being_written_into_cannot_be_removed() {
    run_sequence(&[
        Mkdir { name: 0 },
        Rename { from: 0, to: 1 },
        Create {
            p: 2,
            dir: Some(1),
            name: 0,
        },
        RmImage { image: 1 },
        Write { p: 2, fd: 0 },
    ]);
}

#[test]
fn a_staging_file_is_not_renamed_onto_a_file_being_written() {
    run_sequence(&[
        Create {
            p: 0,
            dir: None,
            name: 2,
        },
        Create {
            p: 0,
            dir: None,
            name: 1,
        },
        Write { p: 0, fd: 0 },
        Rename { from: 2, to: 1 },
        Create {
            p: 0,
            dir: Some(1),
            name: 0,
        },
    ]);
}

#[test]
fn an_image_directory_is_not_renamed_onto_a_file_being_written() {
    run_sequence(&[
        Mkdir { name: 2 },
        Create {
            p: 0,
            dir: None,
            name: 1,
        },
        Rename { from: 2, to: 1 },
        Create {
            p: 0,
            dir: Some(1),
            name: 0,
        },
    ]);
}

#[test]
fn latest_is_not_cached_past_the_deletion_of_its_revision() {
    run_sequence(&[
        Create {
            p: 2,
            dir: None,
            name: 0,
        },
        Write { p: 2, fd: 0 },
        Close { p: 2, fd: 0 },
        List { dir: Some(0) },
        RmRev { image: 0 },
    ]);
}

#[test]
fn a_staging_file_that_is_not_an_image_stays_after_its_rename_fails() {
    run_sequence(&[
        Create {
            p: 2,
            dir: None,
            name: 2,
        },
        Rename { from: 2, to: 0 },
        Create {
            p: 0,
            dir: None,
            name: 0,
        },
        Kill { p: 2 },
    ]);
}

#[test]
fn an_image_renamed_onto_an_empty_directory_is_removed_whole() {
    run_sequence(&[
        Create {
            p: 2,
            dir: None,
            name: 1,
        },
        Write { p: 2, fd: 0 },
        Close { p: 2, fd: 0 },
        Link { src: 1, to: 2 },
        RmRev { image: 1 },
        Rename { from: 2, to: 1 },
        RmImage { image: 1 },
    ]);
}

/// `close` returns before the kernel releases the handle: a writer that closes its new
/// file and opens it again at once (`qemu-img convert`) must not be told the file is
/// taken.
#[test]
fn a_writer_reopens_its_file_before_the_kernel_releases_the_first_handle() {
    let mut w = World::new();
    let repo = w.repo_ino();
    let me = w.me.clone();
    let (entry, first) = w
        .session
        .create(&me, repo, OsStr::new(".new"), 0o644)
        .unwrap();
    w.session.flush(first, 1000).unwrap();
    let again = w
        .session
        .open(&me, entry.ino, libc::O_WRONLY)
        .expect("reopen after the last close, before the release");
    w.session.release(first);
    w.session.write(again.fh, &[0x5a; WRITE], 0).unwrap();
    w.session.flush(again.fh, 1000).unwrap();
    w.session.release(again.fh);
    // While the first handle's descriptor is still open, a second writer is refused.
    let (entry, held) = w
        .session
        .create(&me, repo, OsStr::new(".other"), 0o644)
        .unwrap();
    let err = w
        .session
        .open(&me, entry.ino, libc::O_WRONLY)
        .err()
        .expect("a second writer while the first holds the file");
    assert_eq!(err.errno(), libc::EEXIST);
    w.session.release(held);
}
