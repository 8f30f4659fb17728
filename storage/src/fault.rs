//! `FaultFs`: an in-memory file system that simulates crashes (feature `fault-fs`).
//!
//! It keeps, per file, the durable content and the operations not yet synced, and per
//! directory the durable names and the un-synced creates, renames and removals. A crash can be
//! armed at a given mutating-operation count: that operation and all later ones fail with EIO.
//! [`FaultFs::crash_image`] then builds the file system a restart would see: each un-synced
//! directory operation independently happened or not; each un-synced write independently
//! survived, vanished, was torn (a random prefix of it reached the disk) or became zeros; each
//! un-synced length change independently happened or not. Directories themselves are treated
//! as durable once created. All choices come from the given seed, so a failing case replays.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fs::{FileHandle, FileSystem};

#[derive(Debug, Clone)]
enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct SimFile {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<FileOp>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link {
        path: PathBuf,
        inode: u64,
    },
    Unlink {
        path: PathBuf,
        inode: u64,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
        inode: u64,
    },
}

impl DirOp {
    fn parent(&self) -> Option<&Path> {
        match self {
            DirOp::Link { path, .. } | DirOp::Unlink { path, .. } => path.parent(),
            DirOp::Rename { to, .. } => to.parent(),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Sim {
    files: HashMap<u64, SimFile>,
    next_inode: u64,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    pending_dir: Vec<DirOp>,
    dirs: BTreeSet<PathBuf>,
    ops: u64,
    crash_at: Option<u64>,
    crashed: bool,
}

impl Sim {
    /// Counts one mutating operation, failing it (and everything after) at the crash point.
    fn tick(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(crash_error());
        }
        self.ops += 1;
        if self.crash_at.is_some_and(|at| self.ops >= at) {
            self.crashed = true;
            return Err(crash_error());
        }
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        if self.crashed {
            Err(crash_error())
        } else {
            Ok(())
        }
    }
}

fn crash_error() -> io::Error {
    io::Error::other("simulated crash")
}

fn not_found(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", p.display()),
    )
}

fn apply(data: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write {
            offset,
            data: bytes,
        } => {
            let end = *offset as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*offset as usize..end].copy_from_slice(bytes);
        }
        FileOp::SetLen(len) => data.resize(*len as usize, 0),
    }
}

fn apply_dir(names: &mut BTreeMap<PathBuf, u64>, op: &DirOp) {
    match op {
        DirOp::Link { path, inode } => {
            names.insert(path.clone(), *inode);
        }
        DirOp::Unlink { path, inode } => {
            if names.get(path) == Some(inode) {
                names.remove(path);
            }
        }
        DirOp::Rename { from, to, inode } => {
            if names.get(from) == Some(inode) {
                names.remove(from);
                names.insert(to.clone(), *inode);
            }
        }
    }
}

/// The crash-simulating file system. Clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct FaultFs {
    sim: Arc<Mutex<Sim>>,
}

#[derive(Debug)]
struct FaultFile {
    sim: Arc<Mutex<Sim>>,
    inode: u64,
}

impl FaultFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms a crash: the `n`-th mutating operation from now (1 = the next one) fails, and so
    /// does everything after it.
    pub fn crash_after(&self, n: u64) {
        let mut sim = self.sim.lock();
        sim.crash_at = Some(sim.ops + n.max(1));
    }

    /// Crashes now (every later operation fails).
    pub fn crash_now(&self) {
        self.sim.lock().crashed = true;
    }

    /// Whether the crash point was reached.
    pub fn crashed(&self) -> bool {
        self.sim.lock().crashed
    }

    /// Mutating operations so far.
    pub fn op_count(&self) -> u64 {
        self.sim.lock().ops
    }

    /// The file system a restart after a crash *now* would find, with every un-synced
    /// operation resolved by `seed` (see the module doc). The returned file system has no
    /// pending work and no crash armed.
    pub fn crash_image(&self, seed: u64) -> FaultFs {
        let sim = self.sim.lock();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut names = sim.durable_names.clone();
        for op in &sim.pending_dir {
            if !rng.random_bool(0.5) {
                continue;
            }
            apply_dir(&mut names, op);
        }
        let mut files = HashMap::new();
        for &inode in names.values() {
            let Some(f) = sim.files.get(&inode) else {
                continue;
            };
            if files.contains_key(&inode) {
                continue;
            }
            let mut data = f.durable.clone();
            for op in &f.pending {
                match (op, rng.random_range(0..4u8)) {
                    (
                        FileOp::Write {
                            offset,
                            data: bytes,
                        },
                        2,
                    ) => {
                        let cut = rng.random_range(0..=bytes.len());
                        apply(
                            &mut data,
                            &FileOp::Write {
                                offset: *offset,
                                data: bytes[..cut].to_vec(),
                            },
                        );
                    }
                    (
                        FileOp::Write {
                            offset,
                            data: bytes,
                        },
                        3,
                    ) => {
                        apply(
                            &mut data,
                            &FileOp::Write {
                                offset: *offset,
                                data: vec![0; bytes.len()],
                            },
                        );
                    }
                    (op, 0 | 1) => apply(&mut data, op),
                    _ => {}
                }
            }
            files.insert(
                inode,
                SimFile {
                    data: data.clone(),
                    durable: data,
                    pending: Vec::new(),
                },
            );
        }
        let image = Sim {
            files,
            next_inode: sim.next_inode,
            durable_names: names.clone(),
            names,
            pending_dir: Vec::new(),
            dirs: sim.dirs.clone(),
            ops: 0,
            crash_at: None,
            crashed: false,
        };
        FaultFs {
            sim: Arc::new(Mutex::new(image)),
        }
    }

    /// The file system a process restarted after being *killed* (not a power loss) sees: the
    /// same state, un-synced operations still pending (the page cache survived), no crash
    /// armed. A later [`FaultFs::crash_image`] of the returned file system can still lose them.
    pub fn restart(&self) -> FaultFs {
        let mut sim = self.sim.lock().clone();
        sim.crashed = false;
        sim.crash_at = None;
        FaultFs {
            sim: Arc::new(Mutex::new(sim)),
        }
    }

    /// A one-line summary of names (current and durable) and pending directory operations,
    /// for tracing failing crash cases.
    pub fn describe(&self) -> String {
        let sim = self.sim.lock();
        format!(
            "names {:?} durable {:?} pending {:?}",
            sim.names, sim.durable_names, sim.pending_dir
        )
    }

    /// Flips one byte of a file's current and durable content (bit rot), for tests.
    pub fn corrupt(&self, path: &Path, at: u64) -> io::Result<()> {
        let mut sim = self.sim.lock();
        let inode = *sim.names.get(path).ok_or_else(|| not_found(path))?;
        let f = sim.files.get_mut(&inode).ok_or_else(|| not_found(path))?;
        for d in [&mut f.data, &mut f.durable] {
            if let Some(b) = d.get_mut(at as usize) {
                *b ^= 0x5a;
            }
        }
        Ok(())
    }
}

impl FileHandle for FaultFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let sim = self.sim.lock();
        sim.check()?;
        let f = sim
            .files
            .get(&self.inode)
            .ok_or_else(|| io::Error::other("stale handle"))?;
        let start = (offset as usize).min(f.data.len());
        let n = buf.len().min(f.data.len() - start);
        buf[..n].copy_from_slice(&f.data[start..start + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut sim = self.sim.lock();
        sim.tick()?;
        let f = sim
            .files
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::other("stale handle"))?;
        let op = FileOp::Write {
            offset,
            data: buf.to_vec(),
        };
        apply(&mut f.data, &op);
        f.pending.push(op);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut sim = self.sim.lock();
        sim.tick()?;
        let f = sim
            .files
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::other("stale handle"))?;
        f.durable = f.data.clone();
        f.pending.clear();
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut sim = self.sim.lock();
        sim.tick()?;
        let f = sim
            .files
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::other("stale handle"))?;
        let op = FileOp::SetLen(len);
        apply(&mut f.data, &op);
        f.pending.push(op);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        let sim = self.sim.lock();
        sim.check()?;
        Ok(sim
            .files
            .get(&self.inode)
            .map_or(0, |f| f.data.len() as u64))
    }
}

impl FileSystem for FaultFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.sim.lock();
        sim.check()?;
        let mut p = Some(path);
        while let Some(d) = p {
            if d.as_os_str().is_empty() {
                break;
            }
            sim.dirs.insert(d.to_path_buf());
            p = d.parent();
        }
        Ok(())
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FileHandle>> {
        let sim = self.sim.lock();
        sim.check()?;
        let inode = *sim.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(Arc::new(FaultFile {
            sim: Arc::clone(&self.sim),
            inode,
        }))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileHandle>> {
        let mut sim = self.sim.lock();
        sim.tick()?;
        if sim.names.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        if !path.parent().is_some_and(|d| sim.dirs.contains(d)) {
            return Err(not_found(path));
        }
        sim.next_inode += 1;
        let inode = sim.next_inode;
        sim.files.insert(inode, SimFile::default());
        sim.names.insert(path.to_path_buf(), inode);
        sim.pending_dir.push(DirOp::Link {
            path: path.to_path_buf(),
            inode,
        });
        Ok(Arc::new(FaultFile {
            sim: Arc::clone(&self.sim),
            inode,
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut sim = self.sim.lock();
        sim.tick()?;
        let inode = sim.names.remove(from).ok_or_else(|| not_found(from))?;
        sim.names.insert(to.to_path_buf(), inode);
        // A rename is one directory operation: it happens whole or not at all.
        sim.pending_dir.push(DirOp::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            inode,
        });
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.sim.lock();
        sim.tick()?;
        let inode = sim.names.remove(path).ok_or_else(|| not_found(path))?;
        sim.pending_dir.push(DirOp::Unlink {
            path: path.to_path_buf(),
            inode,
        });
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let sim = self.sim.lock();
        sim.check()?;
        Ok(sim
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut sim = self.sim.lock();
        sim.tick()?;
        let (now, later): (Vec<DirOp>, Vec<DirOp>) = std::mem::take(&mut sim.pending_dir)
            .into_iter()
            .partition(|op| op.parent() == Some(dir));
        sim.pending_dir = later;
        for op in &now {
            apply_dir(&mut sim.durable_names, op);
        }
        Ok(())
    }
}
