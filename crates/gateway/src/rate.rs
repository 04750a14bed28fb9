//! Rate limits per agent and per task: token buckets keyed by the authenticated SPIFFE ID
//! and task id. The call path asks after the token and proof verified (see
//! `control::CallLimiter`), so forged credentials cannot spend anyone's allowance.

use std::collections::HashMap;

use parking_lot::Mutex;

/// A sustained rate with a burst allowance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// The limits the gateway applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub per_agent: Rate,
    pub per_task: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_agent: Rate {
                per_second: 100.0,
                burst: 200,
            },
            per_task: Rate {
                per_second: 50.0,
                burst: 100,
            },
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated_ms: i64,
}

impl Bucket {
    fn refill(&mut self, rate: Rate, now_ms: i64) {
        let elapsed = (now_ms - self.updated_ms).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.updated_ms = now_ms;
    }

    /// Seconds until one token is available (at least 1, for `Retry-After`).
    fn wait_seconds(&self, rate: Rate) -> u64 {
        let missing = (1.0 - self.tokens).max(0.0);
        ((missing / rate.per_second).ceil() as u64).max(1)
    }
}

/// Buckets beyond this many are swept of the ones that refilled completely.
const SWEEP_ABOVE: usize = 100_000;

#[derive(Debug)]
pub struct RateLimiter {
    limits: Limits,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(limits: Limits) -> RateLimiter {
        RateLimiter {
            limits,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn sweep(&self, buckets: &mut HashMap<String, Bucket>, now_ms: i64) {
        let slowest = self
            .limits
            .per_agent
            .per_second
            .min(self.limits.per_task.per_second);
        let burst = self.limits.per_agent.burst.max(self.limits.per_task.burst);
        let full_after_ms = (f64::from(burst) / slowest * 1000.0) as i64;
        buckets.retain(|_, bucket| now_ms - bucket.updated_ms < full_after_ms);
    }
}

impl control::CallLimiter for RateLimiter {
    fn admit(&self, agent: &str, task: &str, now_ms: i64) -> Result<(), u64> {
        let mut buckets = self.buckets.lock();
        if buckets.len() > SWEEP_ABOVE {
            self.sweep(&mut buckets, now_ms);
        }
        let mut take = |key: String, rate: Rate| {
            let bucket = buckets.entry(key).or_insert(Bucket {
                tokens: f64::from(rate.burst),
                updated_ms: now_ms,
            });
            bucket.refill(rate, now_ms);
            (bucket.tokens >= 1.0, bucket.wait_seconds(rate))
        };
        let (agent_ok, agent_wait) = take(format!("agent:{agent}"), self.limits.per_agent);
        let (task_ok, task_wait) = take(format!("task:{task}"), self.limits.per_task);
        if !(agent_ok && task_ok) {
            let wait = match (agent_ok, task_ok) {
                (false, false) => agent_wait.max(task_wait),
                (false, true) => agent_wait,
                _ => task_wait,
            };
            return Err(wait);
        }
        for key in [format!("agent:{agent}"), format!("task:{task}")] {
            if let Some(bucket) = buckets.get_mut(&key) {
                bucket.tokens -= 1.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use control::CallLimiter;

    use super::*;

    #[test]
    fn bursts_then_refills() {
        let limiter = RateLimiter::new(Limits {
            per_agent: Rate {
                per_second: 10.0,
                burst: 3,
            },
            per_task: Rate {
                per_second: 1.0,
                burst: 2,
            },
        });
        assert_eq!(limiter.admit("a", "t1", 0), Ok(()));
        assert_eq!(limiter.admit("a", "t1", 0), Ok(()));
        // The task's burst of 2 is spent; its rate is 1/s.
        assert_eq!(limiter.admit("a", "t1", 0), Err(1));
        // Another task of the same agent has one call left of the agent's burst of 3.
        assert_eq!(limiter.admit("a", "t2", 0), Ok(()));
        assert_eq!(limiter.admit("a", "t2", 0), Err(1));
        // After a second the task has a token again, and the agent has refilled.
        assert_eq!(limiter.admit("a", "t1", 1_000), Ok(()));
        // A refused call spends nothing.
        assert_eq!(limiter.admit("b", "t3", 0), Ok(()));
    }
}
