//! Files an interrupted run must not leave behind: a partitioned run's hidden part files
//! (`.batches.partNN.parquet`, `.trace.partNN.json`), which grow to gigabytes on long runs.
//! They are registered while they exist; the binary's Ctrl-C/SIGTERM handler removes whatever
//! is registered before it exits.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock leaves a list that is still right.
    PENDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `path` is a temporary file of a run in progress.
pub fn register(path: &Path) {
    pending().push(path.to_owned());
}

/// `path` is gone or has become a file the run keeps.
pub fn release(path: &Path) {
    pending().retain(|p| p != path);
}

/// Removes every registered file (the run was interrupted); returns how many were removed.
pub fn remove_all() -> usize {
    pending()
        .drain(..)
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    #[test]
    fn registered_files_are_removed_and_released_ones_kept() {
        let dir = std::env::temp_dir().join(format!("vajra-cleanup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join(".a.part"), dir.join("b"));
        std::fs::write(&a, "x").unwrap();
        std::fs::write(&b, "y").unwrap();
        super::register(&a);
        super::register(&b);
        super::release(&b);
        assert_eq!(super::remove_all(), 1);
        assert!(!a.exists() && b.exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
