//! Typed identifiers. Each id is a newtype over an integer, made by one macro, serialised
//! transparently. Ids are handed out by an [`IdAllocator`] owned by the run, never by a global
//! counter, so two runs in one process do not disturb each other's numbering.

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident($inner:ty)) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw integer.
            #[inline]
            pub const fn get(self) -> $inner {
                self.0
            }
            /// The id as an index into a dense table.
            #[inline]
            pub const fn index(self) -> usize {
                self.0 as usize
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                $name(v)
            }
        }
    };
}

id_type!(
    /// A request, unique within a run.
    RequestId(u64)
);
id_type!(
    /// A KV-cache block on the device (index into the block pool).
    BlockId(u32)
);
id_type!(
    /// A KV-cache block in host memory, used by swap preemption.
    HostBlockId(u32)
);
id_type!(
    /// A replica (one model instance: TP × PP devices) in a cluster.
    ReplicaId(u32)
);
id_type!(
    /// A tenant (client, user or API key) for fairness and accounting.
    TenantId(u32)
);
id_type!(
    /// One scheduler step (one batch).
    StepId(u64)
);

/// Hands out consecutive ids of one kind, starting at zero.
#[derive(Debug, Clone, Default)]
pub struct IdAllocator {
    next: u64,
}

impl IdAllocator {
    /// A fresh allocator whose first id is 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next request id.
    pub fn next_request(&mut self) -> RequestId {
        let id = RequestId(self.next);
        self.next += 1;
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_hands_out_consecutive_ids_from_zero() {
        let mut ids = IdAllocator::new();
        assert_eq!(ids.next_request(), RequestId(0));
        assert_eq!(ids.next_request(), RequestId(1));
    }

    #[test]
    fn ids_serialize_as_bare_integers() {
        assert_eq!(serde_json::to_string(&BlockId(7)).unwrap(), "7");
        let id: RequestId = serde_json::from_str("42").unwrap();
        assert_eq!(id, RequestId(42));
    }
}
