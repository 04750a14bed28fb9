//! The store's one integration-test binary: every case is written once and runs against a
//! fresh SQLite file and a fresh PostgreSQL schema, so the two backends cannot drift apart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod cases;
mod failure;
mod harness;
mod open;
mod tamper;

/// Declares each case once per backend: `sqlite::<case>` and `postgres::<case>`.
macro_rules! on_both_backends {
    ($($module:ident :: $case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = crate::harness::TestDb::sqlite().await;
                    crate::$module::$case(&db).await;
                    db.finish().await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(db) = crate::harness::TestDb::postgres(
                        concat!("postgres::", stringify!($case)),
                    ).await else { return };
                    crate::$module::$case(&db).await;
                    db.finish().await;
                }
            )*
        }
    };
}

on_both_backends!(
    cases::agents,
    cases::operators,
    cases::signing_keys,
    cases::tasks,
    cases::task_calls,
    cases::containment_denials,
    cases::revocation_feed,
    cases::group_commit_keeps_one_chain,
    cases::writer_stats_count_every_operation,
    cases::a_lookup_fill_never_holds_up_the_writer,
    cases::lookups_that_do_not_match_the_log_are_refilled,
    cases::a_failing_append_does_not_sink_its_batch,
    cases::the_writer_chains_onto_the_stored_head,
    cases::each_state_change_writes_one_event,
    cases::query_filters,
    cases::two_stores_share_one_chain,
    cases::large_batches_keep_one_chain_across_stores,
    cases::reopen_continues_the_chain,
    cases::approvals,
    cases::approval_is_spent_once_under_race,
    failure::a_held_write_lock_is_unavailable_within_the_timeout,
    failure::the_operations_waiting_at_once_are_bounded,
    failure::ready_means_a_write_reaches_the_store,
    cases::a_proof_is_spent_once_across_stores,
    tamper::edited_detail,
    tamper::detail_respelled_with_the_same_meaning,
    tamper::event_numbered_zero,
    tamper::edited_actor,
    tamper::deleted_event,
    tamper::forged_event_appended,
    tamper::forged_event_replacing_one,
    tamper::swapped_events,
);

/// Cases that concern SQLite's files alone.
mod sqlite_only {
    macro_rules! sqlite_cases {
        ($($module:ident :: $case:ident),* $(,)?) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let db = crate::harness::TestDb::sqlite().await;
                crate::$module::$case(&db).await;
                db.finish().await;
            }
        )*};
    }

    sqlite_cases!(
        failure::a_removed_store_file_is_noticed,
        failure::a_replaced_store_file_is_noticed,
        failure::a_missing_store_is_not_created_unless_asked,
    );

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_lookup_file_is_rebuilt() {
        let db = crate::harness::TestDb::sqlite().await;
        crate::cases::a_lost_lookup_file_is_rebuilt(&db).await;
        db.finish().await;
    }
}

/// A PostgreSQL test without a server says, in a green run, that it was skipped and which test
/// it was; under `CI=true` the same test fails. Runs this test binary again on one such test.
#[test]
fn a_skipped_postgres_test_names_itself_and_fails_under_ci() {
    let run = |ci: Option<&str>| {
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", "postgres::agents", "--test-threads=1"])
            .env_remove(store::testing::POSTGRES_URL_VAR)
            .env_remove("CI");
        if let Some(ci) = ci {
            command.env("CI", ci);
        }
        command.output().unwrap()
    };
    let skipped = run(None);
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "note: skipped the PostgreSQL test `postgres::agents`: set REMIT_TEST_POSTGRES_URL to run it"
        ),
        "{stderr}"
    );
    let under_ci = run(Some("true"));
    assert!(!under_ci.status.success());
    assert!(
        String::from_utf8_lossy(&under_ci.stdout)
            .contains("REMIT_TEST_POSTGRES_URL must be set under CI"),
        "{}",
        String::from_utf8_lossy(&under_ci.stdout)
    );
}
