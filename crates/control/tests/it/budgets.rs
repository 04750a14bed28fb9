//! A task's budget is the audit log's count of its allowed calls: exact on one node across a
//! crash, and within `budget + (replicas - 1) × max(1, budget / 20)` across replicas, whether
//! the calls come one after another or all at once. Replicas share one SQLite file here (as
//! processes on one machine do) and, with `REMIT_TEST_POSTGRES_URL`, one PostgreSQL schema.

use model::ActionClass;

use crate::harness::{Agent, Harness, github_scopes};

/// Replicas on one store: a SQLite file, or a fresh PostgreSQL schema (dropped by
/// [`Cluster::finish`]).
pub struct Cluster {
    pub nodes: Vec<Harness>,
    schema: Option<store::testing::PostgresSchema>,
}

impl Cluster {
    pub async fn sqlite(count: usize, adjust: fn(&mut control::Settings)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("remit.db").display());
        // The first node keeps the directory: the cluster drops it last.
        let mut dirs = vec![dir];
        dirs.extend((1..count).map(|_| tempfile::tempdir().unwrap()));
        Cluster::on(url, dirs, adjust, None).await
    }

    /// A cluster on a fresh PostgreSQL schema for the test named `test`; `None` (with a note
    /// naming it) when no server is set.
    pub async fn postgres(
        test: &str,
        count: usize,
        adjust: fn(&mut control::Settings),
    ) -> Option<Cluster> {
        let base = store::testing::postgres_url(&format!("the PostgreSQL test `{test}`"))?;
        let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
        let dirs = (0..count).map(|_| tempfile::tempdir().unwrap()).collect();
        Some(Cluster::on(schema.url.clone(), dirs, adjust, Some(schema)).await)
    }

    async fn on(
        url: String,
        dirs: Vec<tempfile::TempDir>,
        adjust: fn(&mut control::Settings),
        schema: Option<store::testing::PostgresSchema>,
    ) -> Cluster {
        let mut nodes = Vec::new();
        for dir in dirs {
            nodes.push(Harness::with_store_configured(url.clone(), dir, adjust).await);
        }
        Cluster { nodes, schema }
    }

    pub async fn finish(self) {
        let Cluster { nodes, schema } = self;
        drop(nodes);
        if let Some(schema) = schema {
            schema.drop_schema().await.unwrap();
        }
    }
}

/// How many of `calls` calls (made in turn by the nodes `0, 1, 2, …`) were allowed, each
/// call either allowed or refused for the budget; all at once when `concurrent`.
async fn allowed_calls(
    cluster: &Cluster,
    agent: &Agent,
    grant: &control::Grant,
    calls: usize,
    concurrent: bool,
) -> usize {
    let call = |i: usize| {
        let node = &cluster.nodes[i % cluster.nodes.len()];
        async move {
            node.call(agent, grant, "read_issue", ActionClass::Read)
                .await
        }
    };
    let verdicts = if concurrent {
        futures::future::join_all((0..calls).map(call)).await
    } else {
        let mut verdicts = Vec::new();
        for i in 0..calls {
            verdicts.push(call(i).await);
        }
        verdicts
    };
    for verdict in &verdicts {
        assert!(
            verdict.is_allow() || verdict.code == "budget_exhausted",
            "{verdict:?}"
        );
    }
    verdicts.iter().filter(|v| v.is_allow()).count()
}

/// A budget of 30 on three replicas: exact with calls one after another (each node counts the
/// others' calls before it leases more), at most 32 (30 + 2 × max(1, 30 / 20)) with calls
/// all at once. Before, each replica enforced the budget it saw: 90 calls passed.
async fn budget_of_thirty_on_three_replicas(cluster: Cluster) {
    let first = &cluster.nodes[0];
    let agent = first.agent("triage-bot", "alice@example.org").await;
    for concurrent in [false, true] {
        let grant = first
            .request(&agent, github_scopes(), None, Some(30))
            .await
            .unwrap();
        let allowed = allowed_calls(&cluster, &agent, &grant, 90, concurrent).await;
        if concurrent {
            assert!((30..=32).contains(&allowed), "{allowed} calls passed");
        } else {
            assert_eq!(allowed, 30, "one call after another");
        }
        // Every node now refuses, and the operator's view counts every node's calls.
        for node in &cluster.nodes {
            let verdict = node
                .call(&agent, &grant, "read_issue", ActionClass::Read)
                .await;
            assert_eq!(verdict.code, "budget_exhausted");
        }
        let task = first
            .authority
            .get_task(&first.admin, grant.task_id.as_str())
            .await
            .unwrap();
        assert_eq!(task.calls_used as usize, allowed);
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_across_replicas_on_sqlite() {
    budget_of_thirty_on_three_replicas(Cluster::sqlite(3, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_across_replicas_on_postgres() {
    let Some(cluster) = Cluster::postgres(
        "budgets::a_budget_holds_across_replicas_on_postgres",
        3,
        |_| {},
    )
    .await
    else {
        return;
    };
    budget_of_thirty_on_three_replicas(cluster).await;
}

/// A node that ends without a catch-up (`kill -9`) forgets nothing: the node that opens the
/// store next counts the calls in the log. Before, the count reached the store only with the
/// next catch-up, and a budget of 100 let 112 calls through here.
#[tokio::test]
async fn a_budget_is_exact_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("remit.db").display());
    let first = Harness::with_store(url.clone(), tempfile::tempdir().unwrap()).await;
    let agent = first.agent("triage-bot", "alice@example.org").await;
    let grant = first
        .request(&agent, github_scopes(), None, Some(100))
        .await
        .unwrap();
    // Twelve calls: two leases of five, and two calls of a third lease, whose other three
    // die with the node.
    for _ in 0..12 {
        let verdict = first
            .call(&agent, &grant, "read_issue", ActionClass::Read)
            .await;
        assert!(verdict.is_allow(), "{verdict:?}");
    }
    drop(first);

    let second = Harness::with_store(url, tempfile::tempdir().unwrap()).await;
    let mut allowed = 12;
    loop {
        let verdict = second
            .call(&agent, &grant, "read_issue", ActionClass::Read)
            .await;
        if !verdict.is_allow() {
            assert_eq!(verdict.code, "budget_exhausted", "{verdict:?}");
            break;
        }
        allowed += 1;
        assert!(allowed <= 100, "more calls than the budget");
    }
    assert_eq!(allowed, 100, "the lost lease's calls are counted afresh");
    let task = second
        .authority
        .get_task(&second.admin, grant.task_id.as_str())
        .await
        .unwrap();
    assert_eq!(task.calls_used, 100);
}

/// On one node, calls all at once spend the budget exactly: a node counts only once its own
/// calls are recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_one_node_spend_the_budget_exactly() {
    let cluster = Cluster::sqlite(1, |_| {}).await;
    let node = &cluster.nodes[0];
    let agent = node.agent("triage-bot", "alice@example.org").await;
    for budget in [7, 45] {
        let grant = node
            .request(&agent, github_scopes(), None, Some(budget))
            .await
            .unwrap();
        let allowed = allowed_calls(&cluster, &agent, &grant, 60, true).await;
        assert_eq!(allowed, budget as usize);
    }
    cluster.finish().await;
}

/// A delegation may hand on only what its parent has left in the whole cluster: a replica
/// that never served the parent still counts the calls the others made. Before, it saw its
/// own (none), and let a child take the whole budget again.
#[tokio::test]
async fn a_delegation_sees_the_calls_other_replicas_made() {
    let cluster = Cluster::sqlite(2, |_| {}).await;
    let (first, second) = (&cluster.nodes[0], &cluster.nodes[1]);
    let lead = first.agent("lead-bot", "alice@example.org").await;
    let helper = first.agent("helper-bot", "bob@example.org").await;
    let parent = first
        .request(&lead, github_scopes(), None, Some(10))
        .await
        .unwrap();
    for _ in 0..4 {
        let verdict = first
            .call(&lead, &parent, "read_issue", ActionClass::Read)
            .await;
        assert!(verdict.is_allow(), "{verdict:?}");
    }
    let subject = parent.token.expose();
    let error = crate::delegation::exchange(second, &helper, subject, None, None, Some(7))
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        error.message.contains("between 1 and 6"),
        "{}",
        error.message
    );
    let child = crate::delegation::exchange(second, &helper, subject, None, None, None)
        .await
        .unwrap();
    let task = second
        .authority
        .get_task(&second.admin, &child.task_id)
        .await
        .unwrap();
    assert_eq!(task.budget, 6, "by default, all the parent has left");
    cluster.finish().await;
}
