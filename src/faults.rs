//! Injected failures for fault tests, off unless `AQUEDUCT_FAULTS` is set (read once at
//! start-up). A comma-separated list of `name=value`:
//!
//! * `produce-reply-drop-every=N`: every N-th acknowledged produce reply is replaced by an
//!   `UNAVAILABLE` error after the batch was written (the client's retry must be recognised
//!   as a duplicate);
//! * `produce-delay-every=N`, `produce-delay-ms=MS`: every N-th idempotent batch waits MS
//!   before it is handed to Raft, holding its partition's sequence gate, so a client that
//!   times out retries while the original is still in flight.
//!
//! Production nodes never set it; unknown names are refused at start-up.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Faults {
    reply_drop_every: u64,
    delay_every: u64,
    delay: Duration,
    replies: AtomicU64,
    batches: AtomicU64,
}

static FAULTS: OnceLock<Faults> = OnceLock::new();

impl Faults {
    /// Parses a fault list (see the module doc).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut f = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| format!("fault {item:?} is not name=value"))?;
            let n: u64 = value
                .parse()
                .map_err(|_| format!("fault {name}: {value:?} is not a number"))?;
            match name {
                "produce-reply-drop-every" => f.reply_drop_every = n,
                "produce-delay-every" => f.delay_every = n,
                "produce-delay-ms" => f.delay = Duration::from_millis(n),
                _ => return Err(format!("unknown fault {name:?}")),
            }
        }
        Ok(f)
    }

    /// Installs the faults of `AQUEDUCT_FAULTS` (once, at start-up).
    pub fn install_from_env() -> Result<(), String> {
        let spec = std::env::var("AQUEDUCT_FAULTS").unwrap_or_default();
        let faults = Self::parse(&spec)?;
        if !spec.is_empty() {
            tracing::warn!(faults = %spec, "fault injection is on");
        }
        let _ = FAULTS.set(faults);
        Ok(())
    }

    fn get() -> Option<&'static Faults> {
        FAULTS.get()
    }

    /// Whether to drop this acknowledged produce reply.
    pub fn drop_reply() -> bool {
        Self::get().is_some_and(|f| {
            f.reply_drop_every > 0
                && f.replies.fetch_add(1, Ordering::Relaxed) % f.reply_drop_every
                    == f.reply_drop_every - 1
        })
    }

    /// How long to hold this idempotent batch before proposing it.
    pub fn produce_delay() -> Option<Duration> {
        let f = Self::get()?;
        (f.delay_every > 0
            && f.batches.fetch_add(1, Ordering::Relaxed) % f.delay_every == f.delay_every - 1)
            .then_some(f.delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_lists_parse_and_unknown_names_are_refused() {
        let f =
            Faults::parse("produce-reply-drop-every=3, produce-delay-ms=200").unwrap_or_default();
        assert_eq!(f.reply_drop_every, 3);
        assert_eq!(f.delay, Duration::from_millis(200));
        assert!(Faults::parse("nope=1").is_err());
        assert!(Faults::parse("produce-delay-ms").is_err());
        assert!(Faults::parse("").is_ok());
    }
}
