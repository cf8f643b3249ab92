//! The waiting queue, ordered by the configured [`QueuePolicy`].
//!
//! - FCFS: a `VecDeque`; new requests at the back, preempted ones at the front. O(1).
//! - Priority, SJF, EDF: a `BTreeMap` keyed by a static key, O(log n). Aging is folded into the
//!   key: a waiting request's effective value `v − r·(now − arrival)` orders the same as
//!   `v + r·arrival` for every `now`, so the order never needs re-sorting.
//! - VTC: one FIFO per tenant and a virtual token counter per tenant; the head is the front
//!   of the non-empty queue whose tenant has the smallest counter. O(tenants) per peek.
//!
//! The queue is an enum with the data of each order in its variant, so an order holds only its
//! own containers and a method matches once on the variant. Entries are scheduler slot numbers. Keys are computed once at push and kept by the caller
//! for removal (abort).

use super::config::QueuePolicy;
use crate::ids::TenantId;
use crate::time::NANOS_PER_SEC;
use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};

/// The facts about a request that queue orders use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryInfo {
    pub slot: u32,
    pub id: u64,
    pub arrival_ns: u64,
    pub priority: i32,
    pub remaining_tokens: u32,
    pub deadline_ns: Option<u64>,
    pub tenant: TenantId,
}

/// Sort key of a keyed queue; ties fall back to arrival then id, so keys are unique.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key {
    primary: f64,
    arrival: u64,
    id: u64,
}

impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        self.primary
            .total_cmp(&o.primary)
            .then(self.arrival.cmp(&o.arrival))
            .then(self.id.cmp(&o.id))
    }
}

#[derive(Debug, Clone, Default)]
struct TenantState {
    counter: f64,
    queue: VecDeque<u32>,
    running: u32,
}

impl TenantState {
    fn active(&self) -> bool {
        !self.queue.is_empty() || self.running > 0
    }
}

/// What a keyed queue sorts by (the key's primary part).
#[derive(Debug, Clone, Copy)]
enum KeyOrder {
    /// `priority + aging_per_sec · arrival_s`.
    Priority { aging_per_sec: f64 },
    /// `remaining tokens + aging_tokens_per_sec · arrival_s`.
    Sjf { aging_tokens_per_sec: f64 },
    /// The absolute deadline; none sorts last.
    Edf,
}

/// Requests in a `BTreeMap` by a static key.
#[derive(Debug, Clone)]
pub(crate) struct KeyedQueue {
    order: KeyOrder,
    map: BTreeMap<Key, u32>,
}

/// VTC: one FIFO per tenant and the tenants' virtual token counters.
#[derive(Debug, Clone)]
pub(crate) struct VtcQueue {
    input_weight: f64,
    output_weight: f64,
    tenants: BTreeMap<TenantId, TenantState>,
    len: usize,
}

impl VtcQueue {
    fn min_active_counter(&self) -> Option<f64> {
        self.tenants
            .values()
            .filter(|t| t.active())
            .map(|t| t.counter)
            .min_by(f64::total_cmp)
    }

    fn head(&self) -> Option<(TenantId, u32)> {
        let mut best: Option<(f64, TenantId, u32)> = None;
        for (&id, t) in &self.tenants {
            if let Some(&slot) = t.queue.front()
                && best.is_none_or(|(c, _, _)| t.counter < c)
            {
                best = Some((t.counter, id, slot));
            }
        }
        best.map(|(_, id, slot)| (id, slot))
    }
}

/// The waiting queue: each order holds only its own containers.
#[derive(Debug, Clone)]
pub(crate) enum WaitingQueue {
    /// FCFS.
    Fifo(VecDeque<u32>),
    /// Priority, SJF, EDF.
    Keyed(KeyedQueue),
    /// Virtual token counters per tenant.
    Vtc(VtcQueue),
}

impl WaitingQueue {
    pub fn new(policy: QueuePolicy) -> Self {
        let keyed = |order| {
            WaitingQueue::Keyed(KeyedQueue {
                order,
                map: BTreeMap::new(),
            })
        };
        match policy {
            QueuePolicy::Fcfs => WaitingQueue::Fifo(VecDeque::new()),
            QueuePolicy::Priority { aging_per_sec } => keyed(KeyOrder::Priority { aging_per_sec }),
            QueuePolicy::Sjf {
                aging_tokens_per_sec,
            } => keyed(KeyOrder::Sjf {
                aging_tokens_per_sec,
            }),
            QueuePolicy::Edf => keyed(KeyOrder::Edf),
            QueuePolicy::Vtc {
                input_weight,
                output_weight,
            } => WaitingQueue::Vtc(VtcQueue {
                input_weight,
                output_weight,
                tenants: BTreeMap::new(),
                len: 0,
            }),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            WaitingQueue::Fifo(q) => q.len(),
            WaitingQueue::Keyed(k) => k.map.len(),
            WaitingQueue::Vtc(v) => v.len,
        }
    }

    fn key(&self, e: &EntryInfo) -> Key {
        let secs = e.arrival_ns as f64 / NANOS_PER_SEC as f64;
        let primary = match self {
            WaitingQueue::Keyed(k) => match k.order {
                KeyOrder::Priority { aging_per_sec } => {
                    f64::from(e.priority) + aging_per_sec * secs
                }
                KeyOrder::Sjf {
                    aging_tokens_per_sec,
                } => f64::from(e.remaining_tokens) + aging_tokens_per_sec * secs,
                KeyOrder::Edf => e.deadline_ns.map_or(f64::INFINITY, |d| d as f64),
            },
            WaitingQueue::Fifo(_) | WaitingQueue::Vtc(_) => 0.0,
        };
        Key {
            primary,
            arrival: e.arrival_ns,
            id: e.id,
        }
    }

    /// Adds a request; `front` puts a preempted request back at the head (FCFS, VTC). Returns
    /// its key, needed by [`Self::remove`].
    pub fn push(&mut self, e: &EntryInfo, front: bool) -> Key {
        let key = self.key(e);
        match self {
            WaitingQueue::Fifo(q) => {
                if front {
                    q.push_front(e.slot)
                } else {
                    q.push_back(e.slot)
                }
            }
            WaitingQueue::Keyed(k) => {
                k.map.insert(key, e.slot);
            }
            WaitingQueue::Vtc(v) => {
                v.len += 1;
                let lift = v.min_active_counter();
                let t = v.tenants.entry(e.tenant).or_default();
                if !t.active()
                    && let Some(min) = lift
                {
                    t.counter = t.counter.max(min);
                }
                if front {
                    t.queue.push_front(e.slot)
                } else {
                    t.queue.push_back(e.slot)
                }
            }
        }
        key
    }

    /// The slot at the head.
    pub fn peek(&self) -> Option<u32> {
        match self {
            WaitingQueue::Fifo(q) => q.front().copied(),
            WaitingQueue::Keyed(k) => k.map.first_key_value().map(|(_, &s)| s),
            WaitingQueue::Vtc(v) => v.head().map(|(_, s)| s),
        }
    }

    /// Removes the head.
    pub fn pop(&mut self) -> Option<u32> {
        match self {
            WaitingQueue::Fifo(q) => q.pop_front(),
            WaitingQueue::Keyed(k) => k.map.pop_first().map(|(_, s)| s),
            WaitingQueue::Vtc(v) => {
                let (tenant, _) = v.head()?;
                let slot = v.tenants.get_mut(&tenant).and_then(|t| t.queue.pop_front());
                v.len -= usize::from(slot.is_some());
                slot
            }
        }
    }

    /// The waiting slots, head first (VTC: tenant by tenant, not in service order).
    pub fn slots(&self) -> Box<dyn Iterator<Item = u32> + '_> {
        match self {
            WaitingQueue::Fifo(q) => Box::new(q.iter().copied()),
            WaitingQueue::Keyed(k) => Box::new(k.map.values().copied()),
            WaitingQueue::Vtc(v) => {
                Box::new(v.tenants.values().flat_map(|t| t.queue.iter().copied()))
            }
        }
    }

    /// Removes a specific entry (abort). Returns whether it was there.
    pub fn remove(&mut self, slot: u32, key: Key, tenant: TenantId) -> bool {
        match self {
            WaitingQueue::Fifo(q) => remove_from(q, slot),
            WaitingQueue::Keyed(k) => k.map.remove(&key).is_some(),
            WaitingQueue::Vtc(v) => {
                let found = v
                    .tenants
                    .get_mut(&tenant)
                    .is_some_and(|t| remove_from(&mut t.queue, slot));
                v.len -= usize::from(found);
                found
            }
        }
    }

    /// VTC: charges a tenant for service (weighted prompt and output tokens).
    pub fn charge(&mut self, tenant: TenantId, prefill: u32, decode: u32) {
        if let WaitingQueue::Vtc(v) = self {
            let t = v.tenants.entry(tenant).or_default();
            t.counter += v.input_weight * f64::from(prefill) + v.output_weight * f64::from(decode);
        }
    }

    /// VTC: a tenant's request started (`+1`) or stopped (`-1`) running.
    pub fn running_changed(&mut self, tenant: TenantId, started: bool) {
        if let WaitingQueue::Vtc(v) = self {
            let t = v.tenants.entry(tenant).or_default();
            if started {
                t.running += 1;
            } else {
                t.running = t
                    .running
                    .checked_sub(1)
                    .expect("VTC running count underflow");
            }
        }
    }

    /// VTC: a tenant's virtual token counter.
    pub fn counter(&self, tenant: TenantId) -> Option<f64> {
        match self {
            WaitingQueue::Vtc(v) => v.tenants.get(&tenant).map(|t| t.counter),
            WaitingQueue::Fifo(_) | WaitingQueue::Keyed(_) => None,
        }
    }
}

fn remove_from(q: &mut VecDeque<u32>, slot: u32) -> bool {
    match q.iter().position(|&s| s == slot) {
        Some(i) => {
            q.remove(i);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(slot: u32, arrival_s: f64, priority: i32, len: u32) -> EntryInfo {
        EntryInfo {
            slot,
            id: u64::from(slot),
            arrival_ns: (arrival_s * 1e9) as u64,
            priority,
            remaining_tokens: len,
            deadline_ns: None,
            tenant: TenantId(0),
        }
    }

    fn drain(q: &mut WaitingQueue) -> Vec<u32> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn fcfs_puts_preempted_requests_at_the_front() {
        let mut q = WaitingQueue::new(QueuePolicy::Fcfs);
        q.push(&info(0, 0.0, 0, 1), false);
        q.push(&info(1, 1.0, 0, 1), false);
        q.push(&info(2, 2.0, 0, 1), true);
        assert_eq!(drain(&mut q), vec![2, 0, 1]);
    }

    #[test]
    fn priority_serves_lower_values_first_then_arrival() {
        let mut q = WaitingQueue::new(QueuePolicy::Priority { aging_per_sec: 0.0 });
        q.push(&info(0, 0.0, 5, 1), false);
        q.push(&info(1, 1.0, 1, 1), false);
        q.push(&info(2, 0.5, 1, 1), false);
        assert_eq!(drain(&mut q), vec![2, 1, 0]);
    }

    #[test]
    fn priority_aging_lets_an_old_low_priority_request_overtake_new_high_priority_ones() {
        let mut q = WaitingQueue::new(QueuePolicy::Priority { aging_per_sec: 1.0 });
        q.push(&info(0, 0.0, 5, 1), false); // key 5
        q.push(&info(1, 10.0, 0, 1), false); // key 10
        assert_eq!(q.peek(), Some(0));
    }

    #[test]
    fn sjf_serves_short_prompts_first_and_aging_bounds_the_wait() {
        let mut q = WaitingQueue::new(QueuePolicy::Sjf {
            aging_tokens_per_sec: 100.0,
        });
        q.push(&info(0, 0.0, 0, 1000), false); // key 1000
        q.push(&info(1, 1.0, 0, 10), false); // key 110
        q.push(&info(2, 20.0, 0, 10), false); // key 2010: arrived > 1000/100 s later
        assert_eq!(drain(&mut q), vec![1, 0, 2]);
    }

    #[test]
    fn edf_serves_earliest_deadline_and_puts_no_deadline_last() {
        let mut q = WaitingQueue::new(QueuePolicy::Edf);
        let mut a = info(0, 0.0, 0, 1);
        a.deadline_ns = Some(50);
        let mut b = info(1, 1.0, 0, 1);
        b.deadline_ns = Some(10);
        let c = info(2, 0.0, 0, 1);
        for e in [&c, &a, &b] {
            q.push(e, false);
        }
        assert_eq!(drain(&mut q), vec![1, 0, 2]);
    }

    #[test]
    fn keyed_removal_takes_out_exactly_that_entry() {
        let mut q = WaitingQueue::new(QueuePolicy::Sjf {
            aging_tokens_per_sec: 0.0,
        });
        let k = q.push(&info(0, 0.0, 0, 5), false);
        q.push(&info(1, 0.0, 0, 5), false);
        assert!(q.remove(0, k, TenantId(0)));
        assert_eq!(drain(&mut q), vec![1]);
    }

    #[test]
    fn vtc_serves_the_tenant_with_the_smallest_counter() {
        let mut q = WaitingQueue::new(QueuePolicy::Vtc {
            input_weight: 1.0,
            output_weight: 2.0,
        });
        let mut a = info(0, 0.0, 0, 1);
        a.tenant = TenantId(1);
        let mut b = info(1, 1.0, 0, 1);
        b.tenant = TenantId(2);
        q.push(&a, false);
        q.push(&b, false);
        q.charge(TenantId(1), 100, 0);
        assert_eq!(q.peek(), Some(1));
    }

    #[test]
    fn vtc_lifts_a_rejoining_tenant_to_the_smallest_active_counter() {
        let mut q = WaitingQueue::new(QueuePolicy::Vtc {
            input_weight: 1.0,
            output_weight: 1.0,
        });
        let mut a = info(0, 0.0, 0, 1);
        a.tenant = TenantId(1);
        q.push(&a, false);
        q.charge(TenantId(1), 500, 0);
        // Tenant 2 was idle all along: it joins at 500, not at 0.
        let mut b = info(1, 1.0, 0, 1);
        b.tenant = TenantId(2);
        q.push(&b, false);
        assert_eq!(q.counter(TenantId(2)), Some(500.0));
    }
}
