//! Durable instance files: a data set is written to a temporary file, fsync'd,
//! then linked into place under a path made only of sanitised UIDs, and its
//! folder fsync'd, so that an acknowledged instance survives a crash and an
//! unacknowledged one leaves nothing behind.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// The spool folder: `tmp/` for instances being received, and
/// `<study>/<series>/<instance>.dcm` for stored ones.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    tmp: PathBuf,
    min_free_bytes: u64,
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
        let tmp = root.join("tmp");
        create_private_dir(root)?;
        create_private_dir(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(Spool {
            root: root.to_path_buf(),
            tmp,
            min_free_bytes,
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

    /// Start a temporary file holding `header` (the Part 10 preamble and meta).
    pub async fn create_temp(&self, header: &[u8]) -> io::Result<TempInstance> {
        let path = self
            .tmp
            .join(format!("{:032x}.part", rand::random::<u128>()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
        writer.write_all(header).await?;
        Ok(TempInstance {
            path,
            writer: Some(writer),
            len: header.len() as u64,
        })
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
    /// file, fsync the folders, and remove the temporary name.
    pub async fn place(&self, sealed: &SealedInstance, relative: &Path) -> io::Result<Placement> {
        let target = self.root.join(relative);
        let tmp = sealed.path.clone();
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let parent = target.parent().unwrap_or(&root).to_path_buf();
            let created = !parent.exists();
            std::fs::create_dir_all(&parent)?;
            match std::fs::hard_link(&tmp, &target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Placement::Exists),
                Err(e) => return Err(e),
            }
            sync_dir(&parent)?;
            if created {
                // New study/series folders must be durable too.
                if let Some(series_parent) = parent.parent() {
                    sync_dir(series_parent)?;
                    if let Some(study_parent) = series_parent.parent() {
                        sync_dir(study_parent)?;
                    }
                }
            }
            std::fs::remove_file(&tmp)?;
            Ok(Placement::Placed)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Replace a file left without a database row by a crash.
    pub async fn replace(&self, sealed: &SealedInstance, relative: &Path) -> io::Result<()> {
        let target = self.root.join(relative);
        let tmp = sealed.path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::rename(&tmp, &target)?;
            if let Some(parent) = target.parent() {
                sync_dir(parent)?;
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

/// An instance being received.
pub struct TempInstance {
    path: PathBuf,
    writer: Option<tokio::io::BufWriter<tokio::fs::File>>,
    len: u64,
}

/// A fully received, fsync'd instance still under its temporary name.
#[derive(Debug)]
pub struct SealedInstance {
    pub path: PathBuf,
    pub len: u64,
}

impl TempInstance {
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| io::Error::other("instance already sealed"))?;
        writer.write_all(bytes).await?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Flush and fsync; the file keeps its temporary name.
    pub async fn seal(mut self) -> io::Result<SealedInstance> {
        let mut writer = self
            .writer
            .take()
            .ok_or_else(|| io::Error::other("instance already sealed"))?;
        let result = async {
            writer.flush().await?;
            writer.get_mut().sync_data().await
        }
        .await;
        match result {
            Ok(()) => Ok(SealedInstance {
                path: std::mem::take(&mut self.path),
                len: self.len,
            }),
            Err(e) => {
                let _ = tokio::fs::remove_file(&self.path).await;
                Err(e)
            }
        }
    }

    /// Drop the partial file.
    pub async fn discard(mut self) {
        self.writer.take();
        let _ = tokio::fs::remove_file(&self.path).await;
    }
}

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

fn create_private_dir(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn sync_dir(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
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
    async fn place_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 0).unwrap();
        let rel = Spool::relative_path("1.2", "1.2.3", "1.2.3.4");
        let mut t = spool.create_temp(b"first").await.unwrap();
        t.write(b"!").await.unwrap();
        let sealed = t.seal().await.unwrap();
        assert_eq!(spool.place(&sealed, &rel).await.unwrap(), Placement::Placed);
        let second = spool
            .create_temp(b"second")
            .await
            .unwrap()
            .seal()
            .await
            .unwrap();
        assert_eq!(spool.place(&second, &rel).await.unwrap(), Placement::Exists);
        second.discard().await;
        assert_eq!(std::fs::read(spool.absolute(&rel)).unwrap(), b"first!");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
