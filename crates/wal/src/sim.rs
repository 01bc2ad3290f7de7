//! An in-memory [`Storage`] that can lose power, for tests (feature `test-util`).
//!
//! Every file keeps two contents: what the program sees (`current`) and what survived its last
//! `sync_data`/`sync_all` (`durable`). Every directory keeps two entry maps likewise, the durable
//! one updated by `sync_dir`. [`SimStorage::crash_after`] arms a crash point: the n-th
//! operation that changes something (create, write, truncate, sync, remove, rename) and every
//! call after it fail, as if the power went off at that instant. [`SimStorage::restart`] then
//! brings the machine back the way a disk would: only directories reachable through durable
//! entries exist, each holding its durable entries; each file holds its durable content, plus,
//! optionally, a random prefix of what was appended after it (a write that partly reached the
//! disk, in order: no holes). Handles opened before the crash fail.
//!
//! This is the storage fault model of FoundationDB's simulation and TigerBeetle's storage
//! tests, reduced to what a log and a checkpoint need: no reordering inside a file, no bit rot.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{OpenMode, Storage, StorageFile};

/// What a directory entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Default, Clone)]
struct Dir {
    current: BTreeMap<OsString, Node>,
    durable: BTreeMap<OsString, Node>,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    /// Every directory that exists now, by path; the root `/` always exists.
    dirs: BTreeMap<PathBuf, Dir>,
    /// Bumped by a restart: handles from before it fail.
    epoch: u64,
    /// Operations that changed something, so far.
    ops: u64,
    /// The power goes off at this operation.
    crash_at: Option<u64>,
    crashed: bool,
}

/// An in-memory file system that can lose power. Clones share the same state.
#[derive(Debug, Clone)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
}

impl Default for SimStorage {
    fn default() -> Self {
        Self::new()
    }
}

fn power_off() -> io::Error {
    io::Error::other("simulated power loss")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} does not exist", path.display()),
    )
}

/// Splits `path` into its parent directory and its name.
fn split(path: &Path) -> io::Result<(PathBuf, OsString)> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((parent.to_path_buf(), name.to_owned())),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent", path.display()),
        )),
    }
}

impl State {
    /// Counts one operation that changes something; fails once the power is off.
    fn tick(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(power_off());
        }
        self.ops += 1;
        if self.crash_at.is_some_and(|at| self.ops >= at) {
            self.crashed = true;
            return Err(power_off());
        }
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        if self.crashed {
            Err(power_off())
        } else {
            Ok(())
        }
    }

    fn lookup(&self, path: &Path) -> io::Result<Node> {
        let (parent, name) = split(path)?;
        self.dirs
            .get(&parent)
            .and_then(|dir| dir.current.get(&name))
            .copied()
            .ok_or_else(|| not_found(path))
    }
}

impl SimStorage {
    /// An empty file system: only the root directory `/`.
    pub fn new() -> Self {
        let mut state = State::default();
        state.dirs.insert(PathBuf::from("/"), Dir::default());
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in a test while holding the lock leaves plain maps: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the `n`-th operation from now on (1 = the next one) and everything after it fail,
    /// as if the power went off then.
    pub fn crash_after(&self, n: u64) {
        let mut state = self.lock();
        state.crash_at = Some(state.ops + n.max(1));
    }

    /// Whether the power is off.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Operations that changed something so far (to choose crash points).
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Turns the power off now, if it is not already.
    pub fn crash_now(&self) {
        self.lock().crashed = true;
    }

    /// Brings the machine back after a power loss (or cuts the power and brings it back, if it
    /// was on): what was not durable is gone. With `torn_seed`, each file whose unsynced content
    /// extends its durable content keeps a pseudo-random prefix of the extension (a write that
    /// partly reached the disk); without, exactly the durable content.
    pub fn restart(&self, torn_seed: Option<u64>) {
        let mut state = self.lock();
        let mut random = torn_seed.map(SplitMix::new);
        // Directories reachable from the root through durable entries, with those entries.
        let mut dirs = BTreeMap::new();
        let mut pending = vec![PathBuf::from("/")];
        while let Some(path) = pending.pop() {
            let durable = state
                .dirs
                .get(&path)
                .map(|dir| dir.durable.clone())
                .unwrap_or_default();
            for (name, node) in &durable {
                if *node == Node::Dir {
                    pending.push(path.join(name));
                }
            }
            dirs.insert(
                path,
                Dir {
                    current: durable.clone(),
                    durable,
                },
            );
        }
        let mut inodes = HashMap::new();
        for dir in dirs.values() {
            for node in dir.durable.values() {
                let Node::File(id) = *node else { continue };
                let Some(inode) = state.inodes.get(&id) else {
                    continue;
                };
                let mut kept = inode.durable.clone();
                if let Some(random) = random.as_mut() {
                    if inode.current.len() > kept.len() && inode.current.starts_with(&kept) {
                        let extra = inode.current.len() - kept.len();
                        let keep = (random.next() % (extra as u64 + 1)) as usize;
                        kept.extend_from_slice(&inode.current[kept.len()..kept.len() + keep]);
                    }
                }
                inodes.insert(
                    id,
                    Inode {
                        current: kept.clone(),
                        durable: kept,
                    },
                );
            }
        }
        state.dirs = dirs;
        state.inodes = inodes;
        state.epoch += 1;
        state.crashed = false;
        state.crash_at = None;
    }
}

impl Storage for SimStorage {
    fn is_dir(&self, path: &Path) -> bool {
        self.lock().dirs.contains_key(path)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        if state.dirs.contains_key(path) {
            return state.check();
        }
        let (parent, name) = split(path)?;
        if !state.dirs.contains_key(&parent) {
            return Err(not_found(&parent));
        }
        if state.lookup(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is a file", path.display()),
            ));
        }
        state.tick()?;
        if let Some(dir) = state.dirs.get_mut(&parent) {
            dir.current.insert(name, Node::Dir);
        }
        state.dirs.insert(path.to_path_buf(), Dir::default());
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let state = self.lock();
        state.check()?;
        let dir = state.dirs.get(path).ok_or_else(|| not_found(path))?;
        Ok(dir.current.keys().cloned().collect())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let mut state = self.lock();
        state.check()?;
        let existing = match state.lookup(path) {
            Ok(Node::File(id)) => Some(id),
            Ok(Node::Dir) => {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    format!("{} is a directory", path.display()),
                ))
            }
            Err(_) => None,
        };
        let id = match (mode, existing) {
            (OpenMode::CreateNew, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ))
            }
            (OpenMode::Read | OpenMode::Append | OpenMode::Write, None) => {
                return Err(not_found(path))
            }
            (OpenMode::Read | OpenMode::Append | OpenMode::Write, Some(id)) => id,
            (OpenMode::CreateTruncate, Some(id)) => {
                state.tick()?;
                if let Some(inode) = state.inodes.get_mut(&id) {
                    inode.current.clear();
                }
                id
            }
            (OpenMode::CreateNew | OpenMode::CreateTruncate, None) => {
                let (parent, name) = split(path)?;
                if !state.dirs.contains_key(&parent) {
                    return Err(not_found(&parent));
                }
                state.tick()?;
                let id = state.next_inode;
                state.next_inode += 1;
                state.inodes.insert(id, Inode::default());
                if let Some(dir) = state.dirs.get_mut(&parent) {
                    dir.current.insert(name, Node::File(id));
                }
                id
            }
        };
        Ok(Box::new(SimFile {
            state: Arc::clone(&self.state),
            inode: id,
            epoch: state.epoch,
            pos: 0,
            append: matches!(mode, OpenMode::Append | OpenMode::CreateNew),
            writable: mode != OpenMode::Read,
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check()?;
        match state.lookup(path)? {
            Node::File(_) => {}
            Node::Dir => {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    format!("{} is a directory", path.display()),
                ))
            }
        }
        state.tick()?;
        let (parent, name) = split(path)?;
        if let Some(dir) = state.dirs.get_mut(&parent) {
            dir.current.remove(&name);
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check()?;
        let node = state.lookup(from)?;
        if node == Node::Dir {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the simulation renames files only",
            ));
        }
        let (to_parent, to_name) = split(to)?;
        if !state.dirs.contains_key(&to_parent) {
            return Err(not_found(&to_parent));
        }
        state.tick()?;
        let (from_parent, from_name) = split(from)?;
        if let Some(dir) = state.dirs.get_mut(&from_parent) {
            dir.current.remove(&from_name);
        }
        if let Some(dir) = state.dirs.get_mut(&to_parent) {
            dir.current.insert(to_name, node);
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check()?;
        if !state.dirs.contains_key(path) {
            return Err(not_found(path));
        }
        state.tick()?;
        if let Some(dir) = state.dirs.get_mut(path) {
            dir.durable = dir.current.clone();
        }
        Ok(())
    }
}

/// An open file of a [`SimStorage`].
#[derive(Debug)]
struct SimFile {
    state: Arc<Mutex<State>>,
    inode: u64,
    epoch: u64,
    pos: u64,
    append: bool,
    writable: bool,
}

impl SimFile {
    fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.check()?;
        if state.epoch != self.epoch {
            return Err(io::Error::other("handle from before a simulated restart"));
        }
        Ok(state)
    }

    fn not_writable() -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, "opened for reading")
    }
}

impl Read for SimFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let state = self.lock()?;
        let content = state
            .inodes
            .get(&self.inode)
            .map(|i| i.current.as_slice())
            .unwrap_or_default();
        let start = usize::try_from(self.pos)
            .unwrap_or(usize::MAX)
            .min(content.len());
        let n = buf.len().min(content.len() - start);
        buf[..n].copy_from_slice(&content[start..start + n]);
        drop(state);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for SimFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.writable {
            return Err(Self::not_writable());
        }
        let mut pos = self.pos;
        let mut state = self.lock()?;
        state.tick()?;
        let inode = state.inodes.entry(self.inode).or_default();
        if self.append {
            pos = inode.current.len() as u64;
        }
        let start = pos as usize;
        if inode.current.len() < start {
            inode.current.resize(start, 0);
        }
        let overlap = (inode.current.len() - start).min(buf.len());
        inode.current[start..start + overlap].copy_from_slice(&buf[..overlap]);
        inode.current.extend_from_slice(&buf[overlap..]);
        drop(state);
        self.pos = pos + buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for SimFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let state = self.lock()?;
        let len = state
            .inodes
            .get(&self.inode)
            .map_or(0, |i| i.current.len() as u64);
        drop(state);
        let target = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => len.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

impl StorageFile for SimFile {
    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.lock()?;
        state.tick()?;
        if let Some(inode) = state.inodes.get_mut(&self.inode) {
            inode.durable = inode.current.clone();
        }
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(Self::not_writable());
        }
        let mut state = self.lock()?;
        state.tick()?;
        let inode = state.inodes.entry(self.inode).or_default();
        inode.current.resize(len as usize, 0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let state = self.lock()?;
        Ok(state
            .inodes
            .get(&self.inode)
            .map_or(0, |i| i.current.len() as u64))
    }
}

/// A small deterministic random number generator (SplitMix64), so that a seed replays a run.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_keeps_only_what_was_synced() {
        let sim = SimStorage::new();
        sim.create_dir_all_durably(Path::new("/d")).unwrap();
        let mut synced = sim.open(Path::new("/d/a"), OpenMode::CreateNew).unwrap();
        synced.write_all(b"kept").unwrap();
        synced.sync_data().unwrap();
        synced.write_all(b" lost").unwrap();
        let mut unsynced_entry = sim.open(Path::new("/d/b"), OpenMode::CreateNew).unwrap();
        unsynced_entry
            .write_all(b"synced data, but no entry")
            .unwrap();
        unsynced_entry.sync_data().unwrap();
        // No directory fsync: neither entry survives.
        sim.restart(None);
        assert_eq!(
            sim.read(Path::new("/d/a")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );

        let sim = SimStorage::new();
        sim.create_dir_all_durably(Path::new("/d")).unwrap();
        let mut a = sim.open(Path::new("/d/a"), OpenMode::CreateNew).unwrap();
        sim.sync_dir(Path::new("/d")).unwrap();
        a.write_all(b"kept").unwrap();
        a.sync_data().unwrap();
        a.write_all(b" lost").unwrap();
        let mut b = sim.open(Path::new("/d/b"), OpenMode::CreateNew).unwrap();
        b.write_all(b"no entry").unwrap();
        b.sync_data().unwrap();
        sim.remove_file(Path::new("/d/a")).unwrap();
        sim.restart(None);
        assert_eq!(
            sim.read(Path::new("/d/a")).unwrap(),
            b"kept",
            "the removal was not synced"
        );
        assert!(!sim.list_dir(Path::new("/d")).unwrap().contains(&"b".into()));
        assert!(a.len().is_err(), "handles from before the restart fail");
    }

    #[test]
    fn the_power_goes_off_at_the_chosen_operation() {
        let sim = SimStorage::new();
        sim.create_dir_all_durably(Path::new("/d")).unwrap();
        let mut file = sim.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
        sim.crash_after(2);
        file.write_all(b"1").unwrap();
        assert!(file.write_all(b"2").is_err());
        assert!(sim.crashed());
        assert!(sim.list_dir(Path::new("/d")).is_err());
        sim.restart(None);
        assert!(sim.list_dir(Path::new("/d")).unwrap().is_empty());
    }

    #[test]
    fn a_torn_restart_keeps_a_prefix_of_the_unsynced_appends() {
        for seed in 0..20 {
            let sim = SimStorage::new();
            sim.create_dir_all_durably(Path::new("/d")).unwrap();
            let mut file = sim.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
            sim.sync_dir(Path::new("/d")).unwrap();
            file.write_all(b"durable").unwrap();
            file.sync_data().unwrap();
            file.write_all(b"-maybe").unwrap();
            sim.restart(Some(seed));
            let content = sim.read(Path::new("/d/f")).unwrap();
            assert!(b"durable-maybe".starts_with(&content) && content.len() >= 7);
        }
    }
}
