//! Where durable files live: a small interface over the file system, so that what is made
//! durable when can be tested.
//!
//! The log (and the services' other durable files: ingest's batch-id ledger is a log too, the
//! aggregator's checkpoints go through [`Storage`] as well) does every file operation through a
//! [`Storage`]. In production that is [`OsStorage`], plain `std::fs`. Tests use
//! `sim::SimStorage` (feature `test-util`), an in-memory file system that can lose power: it
//! keeps, for every file and directory, what was last fsynced, and a simulated crash drops
//! everything else (file contents past the last `sync_data`/`sync_all`, and directory entries
//! created, renamed or removed since the directory's last fsync). `kill -9` cannot test that: the
//! page cache survives a process crash, so a missing or misplaced fsync goes unnoticed.
//!
//! The interface is the subset of POSIX the callers need, with POSIX durability semantics: data
//! written to a file is durable after `sync_data` on it; a new, renamed or removed directory
//! entry is durable after `sync_dir` on the directory holding it.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::Path;

/// How [`Storage::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read an existing file.
    Read,
    /// Append to an existing file (every write goes to its end).
    Append,
    /// Create a new, empty file to append to; fails if it exists.
    CreateNew,
    /// Create the file or truncate it to empty, to write anywhere in it.
    CreateTruncate,
    /// Write anywhere in an existing file (also to cut it with [`StorageFile::set_len`]).
    Write,
}

/// An open file of a [`Storage`].
pub trait StorageFile: Read + Write + Seek + Send + Sync + fmt::Debug {
    /// Makes the file's data (and its size) durable: `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the file's data and metadata durable: `fsync`.
    fn sync_all(&self) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's current length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// A file system: directories of named files.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Whether `path` is an existing directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Creates the directory `path`, whose parent must exist (an existing directory is fine).
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// The names of the entries of the directory `path`, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;
    /// Opens the file `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>>;
    /// Removes the file `path`. Open handles keep reading it (Unix semantics).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames the file `from` to `to`, replacing `to` atomically if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the creations, renames and removals of entries in the directory `path` durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;

    /// Creates `path` and its missing parents, fsyncing the parent of each directory created
    /// so that its own entry is durable (otherwise an OS crash soon after could lose the
    /// directory, and everything reported durable inside it). Returns whether `path` was
    /// created.
    fn create_dir_all_durably(&self, path: &Path) -> io::Result<bool> {
        let mut missing = Vec::new();
        let mut at = path;
        while !self.is_dir(at) {
            missing.push(at);
            match at.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => at = parent,
                _ => break,
            }
        }
        // Outermost first: each one's parent exists when it is made.
        for dir in missing.iter().rev() {
            self.create_dir(dir)?;
            match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => self.sync_dir(parent)?,
                // A relative path's first component lives in the working directory.
                _ => self.sync_dir(Path::new("."))?,
            }
        }
        Ok(!missing.is_empty())
    }

    /// The whole content of the file `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut file = self.open(path, OpenMode::Read)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

/// The real file system (`std::fs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OsStorage;

impl StorageFile for File {
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl Storage for OsStorage {
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        match std::fs::create_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
            other => other,
        }
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(path)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect()
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let mut options = OpenOptions::new();
        match mode {
            OpenMode::Read => options.read(true),
            OpenMode::Append => options.append(true),
            OpenMode::CreateNew => options.append(true).create_new(true),
            OpenMode::CreateTruncate => options.write(true).create(true).truncate(true),
            OpenMode::Write => options.write(true),
        };
        Ok(Box::new(options.open(path)?))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    #[cfg(unix)]
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    /// A no-op where directories cannot be opened as files (this crate targets Unix).
    #[cfg(not(unix))]
    fn sync_dir(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }
}
