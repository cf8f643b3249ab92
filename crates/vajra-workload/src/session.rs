//! Multi-turn sessions: sessions start open-loop, turns follow answers closed-loop.
//!
//! A session's conversation is one token stream: the system prompt, then each turn's new
//! tokens and its answer. Turn k's prompt is the stream up to and including turn k's new
//! tokens; its answer extends the stream. The stream is cut into groups of
//! `hash_block_tokens`, each with an id (the system prompt's own groups share ids across the
//! sessions that use it; every other group is the session's), so turn k + 1 finds turn k's
//! prompt *and answer* in the prefix cache of the replica that served it, as a real server
//! finds the tokens it generated.
//!
//! Everything random about a session (tenant, system prompt, number of turns, every turn's
//! lengths) is drawn when it starts, so the order in which answers complete changes only the
//! think times drawn, never a session's content.

use crate::config::{SessionsConfig, ThinkTime};
use crate::length::{LengthSampler, clip};
use crate::trace::Conversation;
use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use vajra_core::ids::RequestId;
use vajra_core::time::{Duration, Timestamp};

/// One conversation.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    id: u64,
    /// Index of the session's tenant.
    pub tenant: usize,
    system: u32,
    /// Tokens of the conversation so far.
    history: u32,
    /// `(new tokens, answer tokens)` of the turns still to send, the next one last.
    turns: Vec<(u32, u32)>,
}

/// Where the source's pre-built next request came from, to put it back when an answer makes
/// an earlier turn ready.
#[derive(Debug, Clone)]
enum Origin {
    New(Timestamp),
    Ready(Timestamp),
}

/// A turn to issue.
#[derive(Debug, Clone)]
pub(crate) struct Turn {
    pub arrival: Timestamp,
    pub session: u64,
    pub tenant: usize,
    pub prompt: u32,
    pub output: u32,
    pub groups: Vec<u64>,
    pub group_tokens: u32,
    /// Whether the first turn had to be clipped to fit.
    pub clipped: bool,
    /// Whether the session has no turn after this one.
    pub last: bool,
}

/// The sessions state machine.
#[derive(Debug, Clone)]
pub(crate) struct Sessions {
    cfg: SessionsConfig,
    session_gap: Exp<f64>,
    think: Option<Exp<f64>>,
    /// Start time (s) of the latest session drawn.
    t: f64,
    /// The next session to start, drawn one ahead.
    pending: Option<(Timestamp, Session)>,
    /// Sessions waiting for their next turn, by the time it is sent.
    ready: BinaryHeap<Reverse<(Timestamp, u64)>>,
    parked: HashMap<u64, Session>,
    /// Sessions whose turn is being served, by the turn's request id.
    in_flight: HashMap<RequestId, Session>,
    /// The pre-built next turn's session as it was before the turn, and where it came from.
    undo: Option<(RequestId, Origin, Session)>,
    started: u64,
    /// A session drawn would start after the run's end: none will.
    no_more_sessions: bool,
    /// `(cumulative weight, length sampler index)` per tenant.
    tenants: Vec<(f64, usize)>,
    /// Real conversations to replay (each session draws one), or none (turns are drawn).
    conversations: Vec<Conversation>,
    /// Sessions that ended before their last turn because it would not fit.
    pub cut_short: u64,
}

/// What drawing a new session needs from the source.
pub(crate) struct Draw<'a> {
    pub rng_arrival: &'a mut StdRng,
    pub rng_lengths: &'a mut StdRng,
    pub rng_tenant: &'a mut StdRng,
    pub samplers: &'a mut [LengthSampler],
    pub end: Option<Timestamp>,
}

/// A well-mixed 64-bit id for group `j` of stream `(tag, owner)` (SplitMix64 finaliser).
fn group_id(tag: u64, owner: u64, j: u64) -> u64 {
    let mut z = tag
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(owner.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(j.wrapping_mul(0x94d0_49bb_1331_11eb));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const TAG_SYSTEM: u64 = 1;
const TAG_SESSION: u64 = 2;

impl Sessions {
    /// The state machine for a validated config; `conversations` (from
    /// `cfg.conversations`) replace drawn turns when not empty.
    pub fn new(
        cfg: &SessionsConfig,
        tenants: Vec<(f64, usize)>,
        conversations: Vec<Conversation>,
    ) -> Self {
        Sessions {
            tenants,
            conversations,
            session_gap: Exp::new(cfg.qps).expect("validated session rate"),
            think: (cfg.think == ThinkTime::Exponential && cfg.think_time_s > 0.0)
                .then(|| Exp::new(1.0 / cfg.think_time_s).expect("validated think time")),
            cfg: cfg.clone(),
            t: 0.0,
            pending: None,
            ready: BinaryHeap::new(),
            parked: HashMap::new(),
            in_flight: HashMap::new(),
            undo: None,
            started: 0,
            no_more_sessions: false,
            cut_short: 0,
        }
    }

    /// Draws the next session to start (unless it would start after `end`).
    fn draw_session(&mut self, d: &mut Draw<'_>) {
        if self.pending.is_some() || self.no_more_sessions {
            return;
        }
        self.t += self.session_gap.sample(d.rng_arrival);
        let at = Timestamp::from_secs_f64(self.t);
        let u: f64 = d.rng_tenant.random();
        let total = self.tenants.last().map_or(1.0, |t| t.0);
        let tenant = self
            .tenants
            .iter()
            .position(|t| u * total < t.0)
            .unwrap_or(self.tenants.len().saturating_sub(1));
        let sampler = self.tenants.get(tenant).map_or(0, |t| t.1);
        let system = d.rng_tenant.random_range(0..self.cfg.system_prompts);
        let mut turns: Vec<(u32, u32)> = if self.conversations.is_empty() {
            let max = self
                .cfg
                .turns_max
                .expect("validated: turns_max without conversations");
            let n = d.rng_lengths.random_range(self.cfg.turns_min..=max);
            (0..n)
                .map(|_| d.samplers[sampler].sample(d.rng_lengths))
                .collect()
        } else {
            let i = d.rng_lengths.random_range(0..self.conversations.len());
            self.conversations[i].clone()
        };
        turns.reverse();
        if d.end.is_some_and(|e| at > e) {
            self.no_more_sessions = true;
            return;
        }
        let session = Session {
            id: self.started,
            tenant,
            system,
            history: self.cfg.system_prompt_tokens,
            turns,
        };
        self.started += 1;
        self.pending = Some((at, session));
    }

    /// The next turn to issue as request `id`, or `None` until an answer completes (or for
    /// good). `longest` is the longest prompt + output allowed.
    pub fn next_turn(&mut self, id: RequestId, longest: u32, d: &mut Draw<'_>) -> Option<Turn> {
        loop {
            self.draw_session(d);
            let ready_at = self.ready.peek().map(|r| r.0.0);
            let new_at = self.pending.as_ref().map(|p| p.0);
            // A waiting turn goes before a new session starting at the same instant.
            let (origin, mut session) = match (ready_at, new_at) {
                (None, None) => return None,
                (Some(r), n) if n.is_none_or(|n| r <= n) => {
                    let Reverse((at, sid)) = self.ready.pop().expect("peeked");
                    (
                        Origin::Ready(at),
                        self.parked.remove(&sid).expect("a ready session is parked"),
                    )
                }
                _ => {
                    let (at, s) = self.pending.take().expect("peeked");
                    (Origin::New(at), s)
                }
            };
            let at = match origin {
                Origin::New(t) | Origin::Ready(t) => t,
            };
            if d.end.is_some_and(|e| at > e) {
                // Past the run's end: this session sends nothing more.
                continue;
            }
            let before = session.clone();
            let (new, out) = session.turns.pop().expect("a live session has a turn left");
            let first = session.history == self.cfg.system_prompt_tokens
                && matches!(origin, Origin::New(_));
            let wanted = (session.history + new, out);
            let (prompt, output) = if first {
                clip(wanted.0, wanted.1, longest)
            } else if u64::from(wanted.0) + u64::from(wanted.1) > u64::from(longest) {
                // The conversation outgrew the context: the session ends here.
                self.cut_short += 1;
                continue;
            } else {
                wanted
            };
            let g = self.cfg.hash_block_tokens;
            let stream = prompt + output;
            let system_groups = u64::from(self.cfg.system_prompt_tokens / g);
            let groups = (0..u64::from(stream.div_ceil(g)))
                .map(|j| {
                    if j < system_groups {
                        group_id(TAG_SYSTEM, u64::from(session.system), j)
                    } else {
                        group_id(TAG_SESSION, session.id, j)
                    }
                })
                .collect();
            session.history = stream;
            let (tenant, session_id) = (session.tenant, session.id);
            let last = session.turns.is_empty();
            self.undo = Some((id, origin, before));
            self.in_flight.insert(id, session);
            return Some(Turn {
                arrival: at,
                session: session_id,
                tenant,
                prompt,
                output,
                groups,
                group_tokens: g,
                clipped: first && (prompt, output) != wanted,
                last,
            });
        }
    }

    /// Puts back the turn last returned by [`Self::next_turn`] (not yet issued), because an
    /// earlier one became ready.
    pub fn put_back(&mut self) {
        let (id, origin, session) = self.undo.take().expect("a turn to put back");
        self.in_flight.remove(&id);
        match origin {
            Origin::New(t) => {
                // Taking the drawn-ahead session left none pending (see `next_turn`).
                debug_assert!(self.pending.is_none());
                self.pending = Some((t, session));
            }
            Origin::Ready(t) => {
                let sid = session.id;
                self.parked.insert(sid, session);
                self.ready.push(Reverse((t, sid)));
            }
        }
    }

    /// The turn last returned was issued: it can no longer be put back.
    pub fn issued(&mut self) {
        self.undo = None;
    }

    /// Request `id` completed at `now`: its session's next turn becomes ready after a think
    /// (or tool) time. Returns when, if the session goes on.
    pub fn on_finished(
        &mut self,
        id: RequestId,
        now: Timestamp,
        rng: &mut StdRng,
    ) -> Option<Timestamp> {
        let session = self.in_flight.remove(&id)?;
        if self.undo.as_ref().is_some_and(|u| u.0 == id) {
            self.undo = None;
        }
        if session.turns.is_empty() {
            return None;
        }
        let tool = self.cfg.tool_call_probability > 0.0
            && rng.random::<f64>() < self.cfg.tool_call_probability;
        let gap = if tool {
            self.cfg.tool_time_s
        } else {
            match &self.think {
                Some(d) => d.sample(rng),
                None => self.cfg.think_time_s,
            }
        };
        let at = now + Duration::from_secs_f64(gap);
        let sid = session.id;
        self.parked.insert(sid, session);
        self.ready.push(Reverse((at, sid)));
        Some(at)
    }

    /// Request `id`'s session ends without its remaining turns (the turn was rejected).
    pub fn end(&mut self, id: RequestId) {
        if self.in_flight.remove(&id).is_some() {
            self.cut_short += 1;
        }
    }

    /// Whether no turn will ever come again (no session waiting, in flight or to start).
    pub fn is_done(&self) -> bool {
        self.pending.is_none() && self.ready.is_empty() && self.in_flight.is_empty()
    }
}
