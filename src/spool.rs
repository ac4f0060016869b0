//! Durable instance files: a data set is written to a temporary file, fsync'd,
//! then linked into place under a path made only of sanitised UIDs, and its
//! folder fsync'd, so that an acknowledged instance survives a crash and an
//! unacknowledged one leaves nothing behind.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::durable::{sync_dir, sync_dir_and_parents};

/// The spool folder: `tmp/` for instances being received, and
/// `<study>/<series>/<instance>.dcm` for stored ones.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    tmp: PathBuf,
    min_free_bytes: u64,
    /// Series folders whose own entry, and their study folder's, this
    /// process has fsync'd (see [`Spool::sync_placed`]).
    durable_dirs: Arc<Mutex<HashSet<PathBuf>>>,
}

/// Where a sealed instance ended up.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    /// Linked into place; the path is new.
    Placed,
    /// A file already sits at the path (a duplicate, or an orphan of a crash
    /// between link and database commit); the temporary file is untouched.
    Exists,
}

impl Spool {
    /// Open (and create, owner-only) the spool, removing temporary files left
    /// by a crash: they were never acknowledged.
    pub fn open(root: &Path, min_free_bytes: u64) -> io::Result<Self> {
        Self::open_for_node(root, "", min_free_bytes)
    }

    /// As [`Spool::open`] for one of several nodes sharing `root` (a shared
    /// filesystem): its temporary files live in `tmp/<node>/`, so names never
    /// collide across nodes and a node starting up removes only its own
    /// leftovers (and files directly in `tmp/`, which only a node of an
    /// earlier version wrote). An empty `node` uses `tmp/` itself.
    pub fn open_for_node(root: &Path, node: &str, min_free_bytes: u64) -> io::Result<Self> {
        let shared_tmp = root.join("tmp");
        create_private_dir(root)?;
        create_private_dir(&shared_tmp)?;
        let tmp = if node.is_empty() {
            shared_tmp.clone()
        } else {
            let own = shared_tmp.join(node_folder(node));
            create_private_dir(&own)?;
            remove_files_in(&own)?;
            own
        };
        remove_files_in(&shared_tmp)?;
        // The spool's entry in the data folder and tmp/'s (and this node's
        // own tmp folder's) in their parents must survive a power cut too,
        // before anything is placed under them.
        sync_dir_and_parents(&tmp, if node.is_empty() { 2 } else { 3 })?;
        Ok(Spool {
            root: root.to_path_buf(),
            tmp,
            min_free_bytes,
            durable_dirs: Arc::default(),
        })
    }

    /// Refuse to start an instance while the file system is nearly full.
    pub fn check_space(&self) -> io::Result<()> {
        let free = fs4::available_space(&self.root)?;
        if free < self.min_free_bytes {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "{} MB free, below the configured minimum of {} MB",
                    free >> 20,
                    self.min_free_bytes >> 20
                ),
            ));
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Start an instance whose file begins with `header` (the Part 10
    /// preamble and meta). Nothing touches the disk until the first batch is
    /// written (see [`WRITE_BATCH`]).
    pub fn create_temp(&self, header: Vec<u8>) -> TempInstance {
        let path = self
            .tmp
            .join(format!("{:032x}.part", rand::random::<u128>()));
        TempInstance {
            path,
            file: None,
            len: header.len() as u64,
            pending_len: header.len(),
            pending: vec![header],
            failed: false,
        }
    }

    /// The relative path of an instance: every component a sanitised UID.
    pub fn relative_path(study: &str, series: &str, instance: &str) -> PathBuf {
        PathBuf::from(sanitise_uid(study))
            .join(sanitise_uid(series))
            .join(format!("{}.dcm", sanitise_uid(instance)))
    }

    pub fn absolute(&self, relative: &Path) -> PathBuf {
        self.root.join(relative)
    }

    /// Link a sealed temporary file into place without ever overwriting a
    /// file, fsync the folders, and remove the temporary name. Blocking: the
    /// ingest calls it on the blocking pool together with the seal.
    pub fn place_blocking(
        &self,
        sealed: &SealedInstance,
        relative: &Path,
    ) -> io::Result<Placement> {
        let target = self.root.join(relative);
        let parent = target.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent)?;
        match std::fs::hard_link(&sealed.path, &target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Placement::Exists),
            Err(e) => return Err(e),
        }
        self.sync_placed(&parent)?;
        std::fs::remove_file(&sealed.path)?;
        Ok(Placement::Placed)
    }

    /// Make an entry just placed in the series folder `parent` durable, and
    /// the first time this process places there, the series folder's entry
    /// in its study folder and the study folder's in the spool too. That a
    /// folder exists does not make it durable: another association may
    /// have just created it and not yet fsync'd its parents, or a run
    /// killed after its mkdir may have left it in the page cache only; an
    /// acknowledged instance must not hang on such a folder (found by the
    /// power-cut test, tests/it/powercut.rs). One set entry per series.
    fn sync_placed(&self, parent: &Path) -> io::Result<()> {
        let durable = || self.durable_dirs.lock().unwrap_or_else(|e| e.into_inner());
        if durable().contains(parent) {
            return sync_dir(parent);
        }
        sync_dir_and_parents(parent, 2)?;
        durable().insert(parent.to_path_buf());
        Ok(())
    }

    /// Replace a file left without a database row by a crash.
    pub async fn replace(&self, sealed: &SealedInstance, relative: &Path) -> io::Result<()> {
        let target = self.root.join(relative);
        let tmp = sealed.path.clone();
        let spool = self.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::rename(&tmp, &target)?;
            if let Some(parent) = target.parent() {
                spool.sync_placed(parent)?;
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Remove a placed file whose database row could not be committed.
    pub async fn remove(&self, relative: &Path) -> io::Result<()> {
        tokio::fs::remove_file(self.root.join(relative)).await
    }
}

/// A node id as a folder name: itself when made of `[A-Za-z0-9_-]` (and
/// inner dots), otherwise a digest of it, so no id escapes `tmp/`.
fn node_folder(node: &str) -> String {
    let plain = node.len() <= 64
        && !node.starts_with('.')
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain {
        node.to_string()
    } else {
        format!(
            "node-{}",
            hex::encode(&Sha256::digest(node.as_bytes())[..8])
        )
    }
}

/// Remove the plain files of `dir` (not its folders: other nodes' `tmp/`).
fn remove_files_in(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Received bytes are gathered in memory up to this much and then written
/// in one call on the blocking pool. An MR slice (about 0.5 MB) thus costs a
/// single hand-off for all its file work, at seal time; a mammogram one per
/// MiB, instead of a copy and a hand-off per PDU. Memory per association
/// stays bounded by this, whatever the size of the instance.
pub const WRITE_BATCH: usize = 1 << 20;

/// An instance being received.
pub struct TempInstance {
    path: PathBuf,
    /// Created by the first write of a batch.
    file: Option<std::fs::File>,
    /// Bytes received and not written yet (PDV payloads, moved, not copied).
    pending: Vec<Vec<u8>>,
    pending_len: usize,
    len: u64,
    /// A write failed: the file is gone and every later call fails.
    failed: bool,
}

/// A fully received, fsync'd instance still under its temporary name.
#[derive(Debug)]
pub struct SealedInstance {
    pub path: PathBuf,
    pub len: u64,
}

impl TempInstance {
    /// Take the next bytes of the data set.
    pub async fn write(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other("an earlier write failed"));
        }
        self.len += bytes.len() as u64;
        self.pending_len += bytes.len();
        self.pending.push(bytes);
        if self.pending_len < WRITE_BATCH {
            return Ok(());
        }
        let mut batch = Batch::take(self);
        let result = tokio::task::spawn_blocking(move || {
            let r = batch.write();
            if r.is_err() {
                // The partial file goes with the failed batch.
                batch.file = None;
                let _ = std::fs::remove_file(&batch.path);
            }
            (batch, r)
        })
        .await;
        match result {
            Ok((batch, Ok(()))) => {
                self.file = batch.file;
                Ok(())
            }
            Ok((_, Err(e))) => {
                self.fail();
                Err(e)
            }
            Err(e) => {
                self.fail();
                Err(io::Error::other(e))
            }
        }
    }

    /// Write what is pending and fsync (fdatasync: the file's size is data
    /// too), on the calling thread; the file keeps its temporary name. On
    /// error the file is removed.
    pub fn seal_blocking(mut self) -> io::Result<SealedInstance> {
        if self.failed {
            return Err(io::Error::other("an earlier write failed"));
        }
        let mut batch = Batch::take(&mut self);
        let result = batch.write().and_then(|()| match &batch.file {
            Some(f) => f.sync_data(),
            None => Err(io::Error::other("no file")),
        });
        match result {
            Ok(()) => Ok(SealedInstance {
                path: std::mem::take(&mut self.path),
                len: self.len,
            }),
            Err(e) => {
                drop(batch);
                let _ = std::fs::remove_file(&self.path);
                Err(e)
            }
        }
    }

    /// After a failed batch (which removed its file): every later call
    /// fails. A batch lost to a panic leaves its temporary file to the
    /// clean-up at the next start.
    fn fail(&mut self) {
        self.failed = true;
        self.pending = Vec::new();
        self.pending_len = 0;
    }

    /// Drop the partial instance (and its file, when a batch was written).
    pub async fn discard(mut self) {
        if self.file.take().is_some() {
            let path = std::mem::take(&mut self.path);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
        }
    }
}

/// The file work of one batch, moved to the blocking pool and back.
struct Batch {
    path: PathBuf,
    file: Option<std::fs::File>,
    chunks: Vec<Vec<u8>>,
    offset: u64,
}

impl Batch {
    fn take(t: &mut TempInstance) -> Batch {
        let chunks = std::mem::take(&mut t.pending);
        let offset = t.len - t.pending_len as u64;
        t.pending_len = 0;
        Batch {
            path: t.path.clone(),
            file: t.file.take(),
            chunks,
            offset,
        }
    }

    fn write(&mut self) -> io::Result<()> {
        use std::io::Write;
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&self.path)?,
            ),
        };
        let mut written = 0u64;
        for chunk in self.chunks.drain(..) {
            file.write_all(&chunk)?;
            written += chunk.len() as u64;
        }
        start_writeback(file, self.offset, written);
        Ok(())
    }
}

/// Ask the kernel to start writing a batch back now (Linux
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`, as PostgreSQL's
/// `backend_flush_after` and RocksDB's `bytes_per_sync` do), so that the
/// disk works while the rest of a large instance is still on the wire and
/// the fdatasync at the end waits for the last batch only. It promises no
/// durability by itself; where it is unavailable nothing changes.
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor this function borrows.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}

impl SealedInstance {
    pub async fn discard(self) {
        let _ = tokio::fs::remove_file(&self.path).await;
    }
}

/// A UID usable as a path component: PS3.5 9.1 (digits and dots, at most 64,
/// no empty component) after trimming padding. Anything else (path
/// separators, `..`, control bytes, over-long values) becomes a
/// deterministic `2.25.<decimal>` name derived from its SHA-256, so no byte
/// of a data set can make a path outside the spool.
pub fn sanitise_uid(uid: &str) -> String {
    let trimmed = uid.trim_end_matches(['\0', ' ']);
    let valid = !trimmed.is_empty()
        && trimmed.len() <= 64
        && trimmed
            .split('.')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()));
    if valid {
        return trimmed.to_string();
    }
    let digest = Sha256::digest(uid.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    format!("2.25.{}", u128::from_be_bytes(first))
}

/// Create a folder (and its parents) readable by the owner only, whatever
/// the umask: the data folder and the spool hold PHI.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Make a file (the database) readable by the owner only.
pub fn make_private_file(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_with_path_characters_never_escape() {
        assert_eq!(sanitise_uid("1.2.840.10008\0"), "1.2.840.10008");
        for hostile in [
            "../../etc/passwd",
            "1.2/3",
            "..",
            ".",
            "1..2",
            "",
            "1.2.\u{e9}",
            &"9".repeat(65),
        ] {
            let s = sanitise_uid(hostile);
            assert!(s.starts_with("2.25."), "{hostile:?} -> {s}");
            assert!(s.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
        }
        assert_ne!(sanitise_uid("a/b"), sanitise_uid("a/c"));
        let p = Spool::relative_path("../x", "/abs", "1.2.3");
        assert!(
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        );
    }

    #[tokio::test]
    async fn nodes_sharing_a_spool_keep_their_temporary_files_apart() {
        let dir = tempfile::tempdir().unwrap();
        let a = Spool::open_for_node(dir.path(), "node-a", 0).unwrap();
        let mut t = a.create_temp(b"in flight on a".to_vec());
        t.write(b"!".to_vec()).await.unwrap();
        let sealed = t.seal_blocking().unwrap();
        assert!(
            sealed
                .path
                .starts_with(dir.path().join("tmp").join("node-a"))
        );
        // Node b starting up removes its own leftovers, never a's.
        let _b = Spool::open_for_node(dir.path(), "node-b", 0).unwrap();
        assert!(sealed.path.exists());
        assert!(node_folder("../x").starts_with("node-"));
        assert_eq!(node_folder("her2map-2.example"), "her2map-2.example");
    }

    #[tokio::test]
    async fn place_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 0).unwrap();
        let rel = Spool::relative_path("1.2", "1.2.3", "1.2.3.4");
        let mut t = spool.create_temp(b"first".to_vec());
        t.write(b"!".to_vec()).await.unwrap();
        let sealed = t.seal_blocking().unwrap();
        assert_eq!(
            spool.place_blocking(&sealed, &rel).unwrap(),
            Placement::Placed
        );
        let second = spool
            .create_temp(b"second".to_vec())
            .seal_blocking()
            .unwrap();
        assert_eq!(
            spool.place_blocking(&second, &rel).unwrap(),
            Placement::Exists
        );
        second.discard().await;
        assert_eq!(std::fs::read(spool.absolute(&rel)).unwrap(), b"first!");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
