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

/// Buckets beyond this many (agents and tasks together) are swept of the ones that refilled
/// completely.
const SWEEP_ABOVE: usize = 100_000;

/// One map per kind of key, so that a warm call looks its buckets up by the `&str` it has and
/// allocates nothing; a key is copied only when its bucket is first made.
#[derive(Debug, Default)]
struct Buckets {
    agents: HashMap<Box<str>, Bucket>,
    tasks: HashMap<Box<str>, Bucket>,
}

/// The bucket of `key`, made full if there was none, refilled up to `now_ms`. `None` cannot
/// happen (the bucket is made first); the caller refuses if it did.
fn bucket<'m>(
    map: &'m mut HashMap<Box<str>, Bucket>,
    key: &str,
    rate: Rate,
    now_ms: i64,
) -> Option<&'m mut Bucket> {
    if !map.contains_key(key) {
        let full = Bucket {
            tokens: f64::from(rate.burst),
            updated_ms: now_ms,
        };
        map.insert(key.into(), full);
    }
    let bucket = map.get_mut(key)?;
    bucket.refill(rate, now_ms);
    Some(bucket)
}

#[derive(Debug)]
pub struct RateLimiter {
    limits: Limits,
    buckets: Mutex<Buckets>,
}

impl RateLimiter {
    pub fn new(limits: Limits) -> RateLimiter {
        RateLimiter {
            limits,
            buckets: Mutex::new(Buckets::default()),
        }
    }

    fn sweep(&self, buckets: &mut Buckets, now_ms: i64) {
        let slowest = self
            .limits
            .per_agent
            .per_second
            .min(self.limits.per_task.per_second);
        let burst = self.limits.per_agent.burst.max(self.limits.per_task.burst);
        let full_after_ms = (f64::from(burst) / slowest * 1000.0) as i64;
        let fresh = |bucket: &mut Bucket| now_ms - bucket.updated_ms < full_after_ms;
        buckets.agents.retain(|_, bucket| fresh(bucket));
        buckets.tasks.retain(|_, bucket| fresh(bucket));
    }
}

impl control::CallLimiter for RateLimiter {
    fn admit(&self, agent: &str, task: &str, now_ms: i64) -> Result<(), u64> {
        let mut guard = self.buckets.lock();
        let buckets = &mut *guard;
        if buckets.agents.len() + buckets.tasks.len() > SWEEP_ABOVE {
            self.sweep(buckets, now_ms);
        }
        let (per_agent, per_task) = (self.limits.per_agent, self.limits.per_task);
        let Some(agent_bucket) = bucket(&mut buckets.agents, agent, per_agent, now_ms) else {
            return Err(1);
        };
        let (agent_ok, agent_wait) = (
            agent_bucket.tokens >= 1.0,
            agent_bucket.wait_seconds(per_agent),
        );
        let Some(task_bucket) = bucket(&mut buckets.tasks, task, per_task, now_ms) else {
            return Err(1);
        };
        let (task_ok, task_wait) = (
            task_bucket.tokens >= 1.0,
            task_bucket.wait_seconds(per_task),
        );
        if !(agent_ok && task_ok) {
            let wait = match (agent_ok, task_ok) {
                (false, false) => agent_wait.max(task_wait),
                (false, true) => agent_wait,
                _ => task_wait,
            };
            return Err(wait);
        }
        agent_bucket.tokens -= 1.0;
        task_bucket.tokens -= 1.0;
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

    #[test]
    fn an_agent_and_a_task_of_the_same_name_keep_their_own_buckets() {
        let limiter = RateLimiter::new(Limits {
            per_agent: Rate {
                per_second: 1.0,
                burst: 1,
            },
            per_task: Rate {
                per_second: 1.0,
                burst: 5,
            },
        });
        assert_eq!(limiter.admit("x", "x", 0), Ok(()));
        // Agent `x` spent its one call; task `x` has four left, for another agent.
        assert_eq!(limiter.admit("x", "y", 0), Err(1));
        assert_eq!(limiter.admit("z", "x", 0), Ok(()));
    }
}
