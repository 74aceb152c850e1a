//! The kubelet's restart and image-pull backoff (client-go's `flowcontrol.Backoff`, without
//! jitter, as the kubelet configures it): a delay per key that doubles on each failure up to a
//! maximum, and is forgotten once nothing has failed for twice that maximum.
//!
//! Pure: every call is given the times it needs, so tests inject `Instant`s.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// CrashLoopBackOff: a container that exits again waits 10 s, 20 s, 40 s … 300 s.
pub const CRASH_LOOP_INITIAL: Duration = Duration::from_secs(10);
pub const CRASH_LOOP_MAX: Duration = Duration::from_secs(300);
/// ImagePullBackOff: a failed pull is retried after 10 s, 20 s, 40 s … 300 s.
pub const IMAGE_PULL_INITIAL: Duration = Duration::from_secs(10);
pub const IMAGE_PULL_MAX: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    entries: HashMap<String, Entry>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    delay: Duration,
    last_update: Instant,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            entries: HashMap::new(),
        }
    }

    /// Keyed by `<pod uid>/<container name>`.
    pub fn crash_loop() -> Self {
        Self::new(CRASH_LOOP_INITIAL, CRASH_LOOP_MAX)
    }

    /// Keyed by `<pod uid>/<image>`.
    pub fn image_pull() -> Self {
        Self::new(IMAGE_PULL_INITIAL, IMAGE_PULL_MAX)
    }

    /// How long `key` must still wait, counted from `event_time` (for a container, when it
    /// last finished): None when it may go now.
    pub fn in_backoff_since(
        &self,
        key: &str,
        event_time: Instant,
        now: Instant,
    ) -> Option<Duration> {
        let entry = self.live_entry(key, event_time)?;
        let waited = now.saturating_duration_since(event_time);
        (waited < entry.delay).then(|| entry.delay - waited)
    }

    /// How long `key` must still wait, counted from its last failure (`next`): the image-pull
    /// check, where the failure itself is the event.
    pub fn in_backoff_since_update(&self, key: &str, now: Instant) -> Option<Duration> {
        let entry = self.live_entry(key, now)?;
        self.in_backoff_since(key, entry.last_update, now)
    }

    /// The current delay of `key` (for messages such as "back-off 20s restarting failed
    /// container"), None when it has none.
    pub fn delay(&self, key: &str) -> Option<Duration> {
        self.entries.get(key).map(|e| e.delay)
    }

    /// Records a failure of `key` at `event_time`: the first one (or the first after a long
    /// quiet spell) sets the initial delay, later ones double it up to the maximum.
    pub fn next(&mut self, key: &str, event_time: Instant, now: Instant) {
        let delay = match self.live_entry(key, event_time) {
            Some(entry) => (entry.delay * 2).min(self.max),
            None => self.initial,
        };
        self.entries.insert(
            key.to_owned(),
            Entry {
                delay,
                last_update: now,
            },
        );
    }

    pub fn forget(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Drops expired entries, so keys of pods that are gone do not accumulate.
    pub fn gc(&mut self, now: Instant) {
        let max = self.max;
        self.entries
            .retain(|_, e| !expired(now, e.last_update, max));
    }

    /// The entry of `key`, unless it expired before `event_time`.
    fn live_entry(&self, key: &str, event_time: Instant) -> Option<Entry> {
        let entry = *self.entries.get(key)?;
        (!expired(event_time, entry.last_update, self.max)).then_some(entry)
    }
}

/// An entry is stale (its key is considered stable again) after twice the maximum delay.
fn expired(event_time: Instant, last_update: Instant, max: Duration) -> bool {
    event_time.saturating_duration_since(last_update) > max * 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "uid-1/web";

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A container that runs for `ran` seconds after each restart then exits: the waits the
    /// crash-loop backoff imposes before each restart (restarting as soon as allowed).
    fn crash_loop_waits(runs: &[u64]) -> Vec<u64> {
        let t0 = Instant::now();
        let mut backoff = Backoff::crash_loop();
        let mut now = t0;
        runs.iter()
            .map(|&ran| {
                now += secs(ran);
                let finished = now;
                let wait = backoff.in_backoff_since(KEY, finished, now);
                assert_eq!(
                    backoff.in_backoff_since(KEY, finished, now + wait.unwrap_or_default()),
                    None,
                    "free to go once the wait is over"
                );
                now += wait.unwrap_or_default();
                backoff.next(KEY, finished, now);
                wait.map_or(0, |w| w.as_secs())
            })
            .collect()
    }

    #[test]
    fn crash_loop_doubles_to_the_maximum() {
        assert_eq!(
            crash_loop_waits(&[1, 1, 1, 1, 1, 1, 1, 1, 1]),
            [0, 10, 20, 40, 80, 160, 300, 300, 300]
        );
    }

    #[test]
    fn crash_loop_resets_after_ten_minutes_of_running() {
        // 600 s of running is not yet more than twice the maximum; 601 s is.
        assert_eq!(crash_loop_waits(&[1, 1, 1, 600]), [0, 10, 20, 40]);
        assert_eq!(crash_loop_waits(&[1, 1, 1, 601, 1]), [0, 10, 20, 0, 10]);
    }

    #[test]
    fn in_backoff_since_counts_from_the_event() {
        let t0 = Instant::now();
        let mut b = Backoff::new(secs(10), secs(300));
        // (case, event_time, now, expected remaining)
        assert_eq!(b.in_backoff_since(KEY, t0, t0), None, "no entry");
        b.next(KEY, t0, t0);
        let cases = [
            ("just failed", t0, t0, Some(10)),
            ("half way", t0, t0 + secs(4), Some(6)),
            ("wait over", t0, t0 + secs(10), None),
            ("later event", t0 + secs(5), t0 + secs(10), Some(5)),
            ("clock before event", t0 + secs(5), t0, Some(10)),
            (
                "event at expiry bound",
                t0 + secs(600),
                t0 + secs(600),
                Some(10),
            ),
            ("event after expiry", t0 + secs(601), t0 + secs(601), None),
        ];
        for (case, event, now, want) in cases {
            assert_eq!(
                b.in_backoff_since(KEY, event, now),
                want.map(secs),
                "{case}"
            );
        }
        assert_eq!(b.in_backoff_since("other", t0, t0), None, "other keys");
    }

    #[test]
    fn image_pull_counts_from_the_last_failure() {
        let t0 = Instant::now();
        let mut b = Backoff::image_pull();
        assert_eq!(b.in_backoff_since_update(KEY, t0), None);
        b.next(KEY, t0, t0);
        assert_eq!(b.in_backoff_since_update(KEY, t0 + secs(3)), Some(secs(7)));
        assert_eq!(b.in_backoff_since_update(KEY, t0 + secs(10)), None);
        b.next(KEY, t0 + secs(10), t0 + secs(10));
        assert_eq!(b.delay(KEY), Some(secs(20)));
        assert_eq!(b.in_backoff_since_update(KEY, t0 + secs(29)), Some(secs(1)));
        assert_eq!(b.in_backoff_since_update(KEY, t0 + secs(30)), None);
        // Quiet for more than twice the maximum: stable again.
        assert_eq!(b.in_backoff_since_update(KEY, t0 + secs(611)), None);
        b.next(KEY, t0 + secs(611), t0 + secs(611));
        assert_eq!(b.delay(KEY), Some(secs(10)));
    }

    #[test]
    fn forget_and_gc_drop_entries() {
        let t0 = Instant::now();
        let mut b = Backoff::crash_loop();
        b.next("a", t0, t0);
        b.next("b", t0, t0 + secs(100));
        b.next("c", t0, t0);
        b.forget("c");
        assert_eq!(b.delay("c"), None);
        b.gc(t0 + secs(600));
        assert_eq!(
            (b.delay("a"), b.delay("b")),
            (Some(secs(10)), Some(secs(10)))
        );
        b.gc(t0 + secs(601));
        assert_eq!((b.delay("a"), b.delay("b")), (None, Some(secs(10))));
        b.gc(t0 + secs(701));
        assert_eq!(b.delay("b"), None);
    }
}
