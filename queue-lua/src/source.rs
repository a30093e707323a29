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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaSource {
    path: PathBuf,
    code: Arc<[u8]>,
}

impl LuaSource {
    /// Reads the file at `path` now.
    pub fn read(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let code = std::fs::read(&path).map_err(|e| {
            Error::invalid(format!("cannot read Lua source {}: {e}", path.display()))
        })?;
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
}
