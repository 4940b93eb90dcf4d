//! Revisions: the immutable snapshot of a config directory that every job
//! of a deployment runs against.
//!
//! The id is a SHA-256 over every file's path, mode and content (sorted),
//! so the same tree always has the same id. The snapshot itself is a tar
//! archive kept in the store: any node can materialize it, and a file
//! edited while a deployment runs changes nothing for that deployment.
//!
//! What is not config stays out: Slipway's state and VCS data
//! ([`EXCLUDED`]), and whatever the directory's `.slipwayignore` matches
//! (gitignore syntax, the `ignore` crate's matcher: `*.log`, `tmp/`,
//! `!keep.log`). `.slipwayignore` itself and `slipway.toml` are always in.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Directories never part of a revision: Slipway's own state, VCS data.
const EXCLUDED: &[&str] = &[".slipway", ".git", "target"];
/// The config directory's list of what is not part of its revision.
pub const IGNORE_FILE: &str = ".slipwayignore";
/// Files at the top of the directory never left out, whatever
/// `.slipwayignore` says: the list itself (it changes what the revision
/// is) and the config.
const ALWAYS: &[&str] = &[IGNORE_FILE, super::CONFIG_FILE];
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
    #[error("config directory {dir} is too large for a revision ({what}); keep build outputs out of it (or list them in {IGNORE_FILE})")]
    TooLarge { dir: PathBuf, what: String },
    #[error("{path}:{line}:{column}: {message}")]
    Ignore { path: PathBuf, line: usize, column: usize, message: String },
}

/// The rules of `dir/.slipwayignore` (`None`: there is none). A pattern
/// the matcher refuses is an error naming the file, line and column.
pub fn ignore_rules(dir: &Path) -> Result<Option<ignore::gitignore::Gitignore>, RevisionError> {
    let path = dir.join(IGNORE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RevisionError::Io { path, source: e }),
    };
    let mut builder = ignore::gitignore::GitignoreBuilder::new(dir);
    for (i, line) in text.lines().enumerate() {
        if let Err(e) = builder.add_line(Some(path.clone()), line) {
            let column = line.len() - line.trim_start().len() + 1;
            return Err(RevisionError::Ignore { path, line: i + 1, column, message: format!("invalid pattern {:?}: {}", line.trim(), ignore_reason(&e)) });
        }
    }
    builder.build().map(Some).map_err(|e| RevisionError::Ignore { path, line: 1, column: 1, message: ignore_reason(&e) })
}

/// The matcher's reason, without its wrappers ("error parsing glob …").
fn ignore_reason(e: &ignore::Error) -> String {
    let text = e.to_string();
    match text.rsplit_once(": ") {
        Some((_, why)) if text.starts_with("error parsing glob") => why.to_string(),
        _ => text,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RevisionError + '_ {
    move |source| RevisionError::Io { path: path.to_path_buf(), source }
}

/// Snapshot `dir`. `config_text` is the already-validated config, stored
/// beside the archive so a node can plan without unpacking it.
pub fn snapshot(dir: &Path, config_text: &str) -> Result<Revision, RevisionError> {
    let rules = ignore_rules(dir)?;
    let mut files = Vec::new();
    collect(dir, dir, rules.as_ref(), &mut files)?;
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

fn collect(root: &Path, dir: &Path, rules: Option<&ignore::gitignore::Gitignore>, out: &mut Vec<PathBuf>) -> Result<(), RevisionError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let name = entry.file_name();
        let ft = entry.file_type().map_err(io(&path))?;
        // A directory it leaves out is not walked (as git: nothing under
        // it can be taken back with `!`).
        let ignored = rules.is_some_and(|r| {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let always = dir == root && ALWAYS.iter().any(|a| name == *a);
            !always && r.matched(rel, ft.is_dir()).is_ignore()
        });
        if ignored {
            continue;
        }
        if ft.is_dir() {
            if EXCLUDED.iter().any(|e| name == *e) {
                continue;
            }
            collect(root, &path, rules, out)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, body: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, body).expect("write");
    }

    fn files(rev: &Revision) -> Vec<String> {
        let mut out: Vec<String> = tar::Archive::new(rev.archive.as_slice())
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").display().to_string())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn issue18_what_slipwayignore_matches_is_left_out_of_the_revision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write(d, "slipway.toml", "[project]\nname = \"x\"\n");
        write(d, "deploy.sh", "#!/bin/sh\n");
        // It lists itself and the config: both stay in regardless.
        write(d, IGNORE_FILE, "# logs\n*.log\n!keep.log\nscratch/\n.slipwayignore\nslipway.toml\n");
        let first = snapshot(d, "").expect("snapshot");
        assert_eq!(files(&first), [".slipwayignore", "deploy.sh", "slipway.toml"]);

        // Matching files and a matching directory: the same revision.
        write(d, "serve.log", "line\n");
        write(d, "lb/access.log", "line\n");
        write(d, "scratch/tmp.txt", "x");
        write(d, "scratch/keep.log", "x");
        assert_eq!(snapshot(d, "").expect("snapshot").id, first.id, "ignored files change nothing");

        // Negation takes one back; a file nothing matches is in.
        write(d, "keep.log", "kept\n");
        let kept = snapshot(d, "").expect("snapshot");
        assert_ne!(kept.id, first.id);
        assert_eq!(
            files(&kept),
            [".slipwayignore", "deploy.sh", "keep.log", "slipway.toml"],
            "a directory left out is not walked, so scratch/keep.log stays out"
        );
        write(d, "notes.txt", "n");
        assert_ne!(snapshot(d, "").expect("snapshot").id, kept.id);

        // The list is part of the revision: changing it is a new one.
        let before = snapshot(d, "").expect("snapshot").id;
        write(d, IGNORE_FILE, "*.log\n");
        let after = snapshot(d, "").expect("snapshot");
        assert_ne!(after.id, before);
        assert!(!files(&after).contains(&"keep.log".to_string()));
    }

    #[test]
    fn issue18_an_invalid_slipwayignore_pattern_names_its_file_line_and_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "slipway.toml", "");
        write(dir.path(), IGNORE_FILE, "*.log\n\n  build/{a,b\n");
        let e = snapshot(dir.path(), "").expect_err("invalid pattern");
        let path = dir.path().join(IGNORE_FILE);
        assert!(matches!(&e, RevisionError::Ignore { path: p, line: 3, column: 3, .. } if *p == path), "{e:?}");
        let text = e.to_string();
        assert!(text.starts_with(&format!("{}:3:3: invalid pattern \"build/{{a,b\": ", path.display())) && text.contains("unclosed alternate"), "{text}");
        // No file at all: no rules.
        std::fs::remove_file(&path).expect("rm");
        assert!(ignore_rules(dir.path()).expect("no file").is_none());
    }
}
