//! A Lua source file's text, read once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use queue_core::{Error, Result};

/// A Lua source file as read at one moment: its path (for error messages and
/// tracebacks) and its bytes. Clones share the bytes, so every Lua state handed one
/// `LuaSource` runs the same version, whatever happens to the file afterwards (an
/// editor saving it, a deploy copying over it).
///
/// ```
/// use queue_lua::LuaSource;
///
/// let dir = std::env::temp_dir().join(format!("queue-lua-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("h.lua");
/// std::fs::write(&path, "function handle() end").unwrap();
/// let source = LuaSource::read(&path).unwrap();
/// std::fs::write(&path, "").unwrap();
/// assert_eq!(source.code(), b"function handle() end");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct LuaSource {
    path: PathBuf,
    code: Arc<[u8]>,
}

impl LuaSource {
    /// The largest source file read: a configuration naming a device or a log file
    /// by mistake gets an error, not a runtime that reads until memory runs out.
    pub const MAX_BYTES: u64 = 16 * 1024 * 1024;

    /// Reads the file at `path` now. It must be a regular file (not a directory, a
    /// device or a pipe, which could block or never end) of at most
    /// [`LuaSource::MAX_BYTES`].
    pub fn read(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let refuse = |why: String| {
            Error::invalid(format!("cannot read Lua source {}: {why}", path.display()))
        };
        let code = queue_core::config::read_regular_file(&path, Self::MAX_BYTES)
            .map_err(|e| refuse(e.to_string()))?;
        Ok(LuaSource {
            path,
            code: code.into(),
        })
    }

    /// A source whose text is given rather than read, named `path` in messages.
    pub fn from_code(path: impl Into<PathBuf>, code: impl Into<Arc<[u8]>>) -> Self {
        LuaSource {
            path: path.into(),
            code: code.into(),
        }
    }

    /// Where the text was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The text as read.
    pub fn code(&self) -> &[u8] {
        &self.code
    }

    /// The text as read, shared: for [`LuaSource::from_code`] under another spelling
    /// of the same file's path, without a copy.
    pub fn shared_code(&self) -> Arc<[u8]> {
        Arc::clone(&self.code)
    }
}

/// The path and the size: a plan printed with `{:?}` shows which files it holds, not
/// up to 16 MiB of their bytes.
impl std::fmt::Debug for LuaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuaSource")
            .field("path", &self.path)
            .field("bytes", &self.code.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(path: &Path) -> String {
        LuaSource::read(path)
            .expect_err("refused")
            .message()
            .to_string()
    }

    /// A named pipe nobody writes to, `h.lua` in `dir`.
    fn pipe_in(dir: &Path) -> PathBuf {
        let fifo = dir.join("h.lua");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo");
        fifo
    }

    fn at_once<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
        let promise = "opening a named pipe returns at once";
        queue_testkit::finishes_within(std::time::Duration::from_secs(30), promise, work)
    }

    #[test]
    fn what_is_not_a_regular_file_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(refusal(dir.path()).contains("not a regular file"));
        // A device that never ends, and a pipe nobody writes to (opening it would wait).
        assert!(refusal(Path::new("/dev/zero")).contains("not a regular file"));
        let fifo = pipe_in(dir.path());
        let why = at_once(move || refusal(&fifo));
        assert!(why.contains("not a regular file"), "{why}");
    }

    #[test]
    fn a_file_past_the_limit_is_refused_and_one_at_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.lua");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(LuaSource::MAX_BYTES).unwrap();
        assert_eq!(
            LuaSource::read(&path).unwrap().code().len() as u64,
            LuaSource::MAX_BYTES
        );
        file.set_len(LuaSource::MAX_BYTES + 1).unwrap();
        let why = refusal(&path);
        assert!(
            why.contains("larger than 16 MiB") && why.contains("big.lua"),
            "{why}"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let why = refusal(Path::new("/nowhere/h.lua"));
        assert!(
            why.contains("/nowhere/h.lua") && why.contains("No such file"),
            "{why}"
        );
    }
}
