//! Revisions: the immutable snapshot of a config directory that every job
//! of a deployment runs against.
//!
//! The id is a SHA-256 over every file's path, mode and content (sorted),
//! so the same tree always has the same id. The snapshot itself is a tar
//! archive kept in the store: any node can materialize it, and a file
//! edited while a deployment runs changes nothing for that deployment.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Directories never part of a revision: Slipway's own state, VCS data.
const EXCLUDED: &[&str] = &[".slipway", ".git", "target"];
/// A config directory larger than this is refused: it is not a config.
pub const MAX_REVISION_BYTES: u64 = 64 << 20;
pub const MAX_REVISION_FILES: usize = 20_000;

#[derive(Debug, Clone)]
pub struct Revision {
    /// Hex SHA-256 of the tree.
    pub id: String,
    /// The text of `slipway.toml` in this revision.
    pub config_text: String,
    /// Tar archive of the tree.
    pub archive: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RevisionError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("config directory {dir} is too large for a revision ({what}); keep build outputs out of it")]
    TooLarge { dir: PathBuf, what: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RevisionError + '_ {
    move |source| RevisionError::Io { path: path.to_path_buf(), source }
}

/// Snapshot `dir`. `config_text` is the already-validated config, stored
/// beside the archive so a node can plan without unpacking it.
pub fn snapshot(dir: &Path, config_text: &str) -> Result<Revision, RevisionError> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort();
    if files.len() > MAX_REVISION_FILES {
        return Err(RevisionError::TooLarge { dir: dir.to_path_buf(), what: format!("{} files", files.len()) });
    }
    let mut hasher = Sha256::new();
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    let mut total = 0u64;
    for rel in &files {
        let full = dir.join(rel);
        let meta = std::fs::symlink_metadata(&full).map_err(io(&full))?;
        let rel_str = rel.to_string_lossy();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(io(&full))?;
            hasher.update(format!("L\0{rel_str}\0{}\0", target.display()).as_bytes());
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            builder.append_link(&mut header, rel, &target).map_err(io(&full))?;
            continue;
        }
        let mut content = Vec::new();
        std::fs::File::open(&full).and_then(|mut f| f.read_to_end(&mut content)).map_err(io(&full))?;
        total += content.len() as u64;
        if total > MAX_REVISION_BYTES {
            return Err(RevisionError::TooLarge { dir: dir.to_path_buf(), what: format!("more than {MAX_REVISION_BYTES} bytes") });
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
        hasher.update(format!("F\0{rel_str}\0{mode:o}\0{}\0", content.len()).as_bytes());
        hasher.update(&content);
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(mode);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, rel, content.as_slice()).map_err(io(&full))?;
    }
    let archive = builder.into_inner().map_err(io(dir))?;
    Ok(Revision { id: hex::encode(hasher.finalize()), config_text: config_text.to_string(), archive })
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), RevisionError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let name = entry.file_name();
        let ft = entry.file_type().map_err(io(&path))?;
        if ft.is_dir() {
            if EXCLUDED.iter().any(|e| name == *e) {
                continue;
            }
            collect(root, &path, out)?;
        } else if ft.is_file() || ft.is_symlink() {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
        if out.len() > MAX_REVISION_FILES {
            return Err(RevisionError::TooLarge { dir: root.to_path_buf(), what: format!("more than {MAX_REVISION_FILES} files") });
        }
    }
    Ok(())
}

/// Unpack a revision under `work_dir/<id>` unless already there, and
/// return that directory. Unpacks to a temporary name and renames, so a
/// half-written tree is never used.
pub fn materialize(work_dir: &Path, id: &str, archive: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(work_dir)?;
    // Absolute, so a job's relative program path resolves inside it.
    let work_dir = &std::fs::canonicalize(work_dir)?;
    let dest = work_dir.join(id);
    if dest.is_dir() {
        return Ok(dest);
    }
    let tmp = work_dir.join(format!(".{id}.{}.{}", std::process::id(), rand::random::<u32>()));
    tar::Archive::new(archive).unpack(&tmp)?;
    match std::fs::rename(&tmp, &dest) {
        Ok(()) => Ok(dest),
        Err(_) if dest.is_dir() => {
            // Another node or task won the race; theirs is identical.
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dest)
        }
        Err(e) => Err(e),
    }
}

/// Short form of a revision id for humans.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
