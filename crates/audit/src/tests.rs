use serde_json::json;

use super::*;

fn chain(n: u64) -> Vec<Event> {
    let mut prev = GENESIS;
    (1..=n)
        .map(|seq| {
            let body = EventBody::new(1_700_000_000_000 + seq as i64, kinds::TASK_GRANTED, "remit")
                .agent("spiffe://example.org/agent/bot")
                .task(format!("task-{seq}"))
                .detail(json!({"z": 1, "a": [seq, "x"], "m": {"b": true, "a": null}}));
            let event = Event::seal(seq, prev, body);
            prev = event.hash;
            event
        })
        .collect()
}

fn first_break(events: &[Event]) -> Option<u64> {
    verify(events).err().map(|b| b.seq)
}

#[test]
fn an_intact_chain_verifies() {
    assert_eq!(verify(&chain(10)), Ok(10));
    assert_eq!(verify(&[]), Ok(0));
}

#[test]
fn tampering_names_the_first_bad_event() {
    let mut edited = chain(10);
    edited[4].body.actor = "someone-else".into();
    assert_eq!(first_break(&edited), Some(5));

    let mut edited_detail = chain(10);
    edited_detail[6].body.detail = json!({"z": 2}).into();
    assert_eq!(first_break(&edited_detail), Some(7));

    let mut deleted = chain(10);
    deleted.remove(3);
    assert_eq!(first_break(&deleted), Some(4));

    let mut deleted_last = chain(10);
    deleted_last.pop();
    // Removing the tail is invisible to a chain alone; checkpoints of the head catch it.
    assert_eq!(first_break(&deleted_last), None);

    let mut inserted = chain(10);
    let forged = Event::seal(4, inserted[2].hash, EventBody::new(0, "forged", "x"));
    inserted.insert(3, forged);
    // The forgery chains onto event 3, so the break shows where two events claim number 4.
    assert_eq!(first_break(&inserted), Some(4));

    let mut reordered = chain(10);
    reordered.swap(5, 6);
    assert_eq!(first_break(&reordered), Some(6));

    // Renumbering after a deletion hides the gap but not the broken link.
    let mut renumbered = chain(10);
    renumbered.remove(3);
    for (i, e) in renumbered.iter_mut().enumerate().skip(3) {
        e.seq = i as u64 + 1;
    }
    assert_eq!(first_break(&renumbered), Some(4));
}

#[test]
fn canonical_json_sorts_keys_and_has_no_spaces() {
    let mut out = String::new();
    canonical_json(
        &json!({"b": [1, {"d": "é\n", "c": 2.5}], "a": null}),
        &mut out,
    );
    assert_eq!(out, r#"{"a":null,"b":[1,{"c":2.5,"d":"é\n"}]}"#);
}

#[test]
fn the_encoding_is_stable() {
    // A fixed vector, computed independently from the documented encoding (Python:
    // hashlib.sha256 over the fields as the crate docs lay them out). Changing the encoding
    // would orphan every existing log.
    let body = EventBody::new(1_700_000_000_000, kinds::AGENT_REGISTERED, "operator:op_1")
        .agent("spiffe://example.org/agent/bot")
        .detail(json!({"owner": "alice@example.org"}));
    let event = Event::seal(1, GENESIS, body);
    assert_eq!(
        to_hex(&event.hash),
        "5d6d44f3e56f97c091668aaaf4a2be90412319a3735543e9414e3f3b36b4798e"
    );
}

#[test]
fn hashes_round_trip_through_hex() {
    let hash = chain(1)[0].hash;
    assert_eq!(from_hex(&to_hex(&hash)), Some(hash));
    assert_eq!(from_hex(&to_hex(&hash).to_uppercase()), Some(hash));
    assert_eq!(from_hex("zz"), None);
    assert_eq!(from_hex(&"g".repeat(64)), None);
}

#[test]
fn hex_spells_every_byte_value_in_both_cases() {
    for first in 0..=u8::MAX {
        let mut hash = [0u8; 32];
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = first.wrapping_add(u8::try_from(i).unwrap().wrapping_mul(37));
        }
        let expected: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(to_hex(&hash), expected);
        assert_eq!(to_hex_upper(&hash), expected.to_uppercase());
    }
}

/// An event of `chain` in the form a store holds it, with `detail` as the given text.
fn stored<'a>(event: &'a Event, detail: &'a str) -> StoredEvent<'a> {
    StoredEvent {
        detail,
        ..event.stored()
    }
}

#[test]
fn the_stored_form_verifies_like_the_parsed_form() {
    let events = chain(10);
    let mut verifier = ChainVerifier::default();
    for event in &events {
        assert_eq!(
            event.body.detail.as_str(),
            format!(
                r#"{{"a":[{},"x"],"m":{{"a":null,"b":true}},"z":1}}"#,
                event.seq
            )
        );
        verifier
            .push_stored(&stored(event, event.body.detail.as_str()))
            .unwrap();
    }
    assert_eq!(verifier.checked(), 10);
    assert_eq!(verifier.head(), events[9].hash);
}

#[test]
fn a_detail_stored_in_non_canonical_form_is_a_break() {
    let events = chain(3);
    let mut verifier = ChainVerifier::default();
    verifier
        .push_stored(&stored(&events[0], events[0].body.detail.as_str()))
        .unwrap();
    // The same meaning as the canonical text, but with a space and the keys out of order:
    // the stored bytes are what is hashed, so this is reported, not silently accepted.
    let respelled = r#"{"z": 1, "a": [2, "x"], "m": {"b": true, "a": null}}"#;
    let parsed: serde_json::Value = serde_json::from_str(respelled).unwrap();
    assert_eq!(parsed, events[1].body.detail.to_value());
    assert_eq!(
        verifier.push_stored(&stored(&events[1], respelled)),
        Err(ChainBreak {
            seq: 2,
            reason: BreakReason::Content
        })
    );
}

#[test]
fn a_detail_written_field_by_field_is_the_canonical_text() {
    let policies = vec!["p1".to_string(), "quote\"d".to_string()];
    let built = Detail::object()
        .str("action", "list_issues")
        .opt_u64("audit_seq", None)
        .bool("complete", true)
        .strs("policies", &policies)
        .opt_str("resource", Some("acme/é\n"))
        .u64("status", 200)
        .value("z", &json!({"b": 1, "a": [null]}))
        .finish();
    let value = json!({
        "action": "list_issues",
        "audit_seq": null,
        "complete": true,
        "policies": policies,
        "resource": "acme/é\n",
        "status": 200,
        "z": {"a": [null], "b": 1},
    });
    assert_eq!(built, Detail::from_value(&value));
    assert_eq!(
        built.as_str(),
        r#"{"action":"list_issues","audit_seq":null,"complete":true,"policies":["p1","quote\"d"],"resource":"acme/é\n","status":200,"z":{"a":[null],"b":1}}"#
    );
    assert_eq!(built.to_value(), value);
    assert_eq!(Detail::object().finish().as_str(), "{}");
    assert_eq!(Detail::object().finish(), Detail::empty());
}

#[test]
fn a_detail_with_keys_out_of_order_is_still_canonical() {
    // Out of order and repeated keys: sorted at the end, the last value of a key kept (as a
    // parsed `Value` keeps it).
    let built = Detail::object()
        .u64("status", 1)
        .str("action", "a")
        .u64("status", 2)
        .finish();
    assert_eq!(built.as_str(), r#"{"action":"a","status":2}"#);
}

#[test]
fn a_detail_key_that_needs_escaping_is_escaped() {
    let built = Detail::object()
        .u64("a\"b", 1)
        .u64("c\\d", 2)
        .u64("e\nf", 3)
        .u64("é", 4)
        .finish();
    assert_eq!(built.as_str(), r#"{"a\"b":1,"c\\d":2,"e\nf":3,"é":4}"#);
    assert_eq!(
        built,
        Detail::from_value(&json!({"a\"b": 1, "c\\d": 2, "e\nf": 3, "é": 4}))
    );
}

#[test]
fn a_stored_detail_is_kept_byte_for_byte_and_must_be_json() {
    let respelled = r#"{"z": 1, "a": 2}"#;
    let detail = Detail::stored(respelled.to_string()).unwrap();
    assert_eq!(detail.as_str(), respelled);
    assert_eq!(detail.to_value(), json!({"a": 2, "z": 1}));
    assert!(Detail::stored("{\"a\":".to_string()).is_err());
    assert!(Detail::stored(String::new()).is_err());
}

#[test]
fn an_event_round_trips_through_json_with_its_detail_as_an_object() {
    let event = chain(1).remove(0);
    let json = serde_json::to_value(&event).unwrap();
    assert_eq!(
        json["detail"],
        json!({"z": 1, "a": [1, "x"], "m": {"b": true, "a": null}})
    );
    let back: Event = serde_json::from_value(json).unwrap();
    assert_eq!(back, event);
    assert_eq!(verify(&[back]), Ok(1));
}
