//! The replay cache: bounded, forgets only what has expired, and refuses rather than forgets
//! when full.

use crate::{Admission, ProofCheck, ProofVerifier, ReplayCache};

const NOW: i64 = 1_700_000_000;

#[test]
fn remembers_until_expiry() {
    let cache = ReplayCache::new(10);
    assert_eq!(cache.check_and_insert("a", NOW + 60, NOW), Admission::Fresh);
    assert_eq!(
        cache.check_and_insert("a", NOW + 60, NOW + 60),
        Admission::Replayed
    );
    assert_eq!(cache.check_and_insert("b", NOW + 60, NOW), Admission::Fresh);
    // Past its expiry the entry no longer counts (the proof would be refused as too old).
    assert_eq!(
        cache.check_and_insert("a", NOW + 120, NOW + 61),
        Admission::Fresh
    );
    assert_eq!(cache.len(), 2);
}

#[test]
fn full_cache_evicts_expired_entries_then_refuses() {
    let cache = ReplayCache::new(3);
    assert_eq!(cache.capacity(), 3);
    for key in ["a", "b", "c"] {
        assert_eq!(cache.check_and_insert(key, NOW + 10, NOW), Admission::Fresh);
    }
    // Full of unexpired entries: refuse the newcomer and forget nothing.
    assert_eq!(cache.check_and_insert("d", NOW + 10, NOW), Admission::Full);
    for key in ["a", "b", "c"] {
        assert_eq!(
            cache.check_and_insert(key, NOW + 10, NOW + 10),
            Admission::Replayed
        );
    }
    // Once they expire, they make room.
    assert_eq!(
        cache.check_and_insert("d", NOW + 20, NOW + 11),
        Admission::Fresh
    );
    assert_eq!(cache.len(), 1);
}

#[test]
fn sharded_cache_stays_bounded_and_forgets_nothing_live() {
    let cache = ReplayCache::new(1024);
    let capacity = cache.capacity();
    assert!(capacity >= 1024);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..capacity * 2 {
        let key = format!("jkt.{i}");
        match cache.check_and_insert(&key, NOW + 60, NOW) {
            Admission::Fresh => accepted.push(key),
            Admission::Full => refused += 1,
            Admission::Replayed => panic!("{key} was never inserted"),
        }
    }
    assert!(cache.len() <= capacity && accepted.len() == cache.len());
    assert!(
        refused >= capacity,
        "half the attempts must be refused, {refused} were"
    );
    for key in &accepted {
        assert_eq!(
            cache.check_and_insert(key, NOW + 60, NOW + 30),
            Admission::Replayed
        );
    }
}

#[test]
fn proof_verifier_fails_closed_when_full() {
    let agent = crate::AgentKeyPair::generate_ed25519().unwrap();
    let verifier = ProofVerifier::new(60, 5, 2);
    let url = "https://remit.example.org/v1/tasks";
    let check = |now| ProofCheck {
        method: "POST",
        url,
        access_token: None,
        expected_jkt: None,
        now,
    };
    let verify = |jti: &str, now: i64| {
        let proof = agent.sign_proof("POST", url, None, now, jti).unwrap();
        verifier
            .verify(&proof, &check(now))
            .map(|_| ())
            .map_err(|e| e.code())
    };
    assert_eq!(verify("1", NOW), Ok(()));
    assert_eq!(verify("2", NOW), Ok(()));
    assert_eq!(verify("3", NOW), Err("proof_replay_cache_full"));
    assert_eq!(verifier.replay_cache().len(), 2);
    // When the first two are too old to be accepted anyway, they make room.
    assert_eq!(verify("3", NOW + 61), Ok(()));
}

#[test]
fn a_jti_is_replayed_only_under_the_same_key() {
    let agent = crate::AgentKeyPair::generate_ed25519().unwrap();
    let other = crate::AgentKeyPair::generate_ed25519().unwrap();
    let verifier = ProofVerifier::new(60, 5, 100);
    let url = "https://remit.example.org/v1/tasks";
    let check = ProofCheck {
        method: "POST",
        url,
        access_token: None,
        expected_jkt: None,
        now: NOW,
    };
    let verify = |key: &crate::AgentKeyPair, jti: &str| {
        let proof = key.sign_proof("POST", url, None, NOW, jti).unwrap();
        verifier
            .verify(&proof, &check)
            .map(|_| ())
            .map_err(|e| e.code())
    };
    assert_eq!(verify(&agent, "same"), Ok(()));
    // The very same proof again, and another proof with the same jti and key: both replays.
    let proof = agent.sign_proof("POST", url, None, NOW, "again").unwrap();
    assert!(verifier.verify(&proof, &check).is_ok());
    assert_eq!(
        verifier.verify(&proof, &check).map_err(|e| e.code()),
        Err("proof_replayed")
    );
    assert_eq!(verify(&agent, "same"), Err("proof_replayed"));
    // Another key may use the same jti.
    assert_eq!(verify(&other, "same"), Ok(()));
    assert_eq!(verify(&other, "same"), Err("proof_replayed"));
    assert_eq!(verifier.replay_cache().len(), 3);
}
