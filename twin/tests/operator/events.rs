//! The event log and the report rate: what a car sends cannot grow the twin without bound.

use super::*;

#[tokio::test]
async fn event_messages_and_kinds_are_cut_to_their_limits_with_a_marker() {
    let env = Env::new();
    let mut config = env.config();
    config.event_message_max_bytes = 100;
    let twin = env.start_with(config).await;
    let files = register(&env, &twin, "VIN-E1").await;
    let link = connected(&env, &twin, &files, "VIN-E1").await;
    send_event(&link, 1, &"k".repeat(100), &"é".repeat(150)).await;
    let cut = "k".repeat(63) + "…";
    until("the cut event", || async {
        !events_of_kind(&twin, "VIN-E1", &cut).await.is_empty()
    })
    .await;
    let event = events_of_kind(&twin, "VIN-E1", &cut).await.remove(0);
    let message = event["message"].as_str().unwrap();
    assert!(message.len() <= 100, "{} bytes", message.len());
    assert!(message.starts_with("éé"), "{message}");
    assert!(message.ends_with("… [cut, 300 bytes in all]"), "{message}");
}

#[tokio::test]
async fn a_car_keeps_only_its_newest_events() {
    let env = Env::new();
    let mut config = env.config();
    config.events_per_car = 10;
    let twin = env.start_with(config).await;
    let files = register(&env, &twin, "VIN-E2").await;
    let link = connected(&env, &twin, &files, "VIN-E2").await;
    for seq in 0..25 {
        send_event(&link, seq + 1, "note", &format!("e{seq}")).await;
    }
    until("the last event", || async {
        all_events(&twin, "VIN-E2")
            .await
            .last()
            .is_some_and(|e| e["message"] == "e24")
    })
    .await;
    let messages: Vec<Value> = all_events(&twin, "VIN-E2")
        .await
        .into_iter()
        .map(|e| e["message"].clone())
        .collect();
    let expected: Vec<Value> = (15..25).map(|i| json!(format!("e{i}"))).collect();
    assert_eq!(messages, expected);
}

#[tokio::test]
async fn events_past_their_age_are_removed_by_the_periodic_sweep() {
    let env = Env::new();
    let mut config = env.config();
    config.event_max_age_secs = 1;
    config.event_sweep_secs = 1;
    let twin = env.start_with(config).await;
    register(&env, &twin, "VIN-E3").await;
    assert_eq!(events_of_kind(&twin, "VIN-E3", "registered").await.len(), 1);
    until("the registration event to age out", || async {
        all_events(&twin, "VIN-E3").await.is_empty()
    })
    .await;
    let (_, view) = api(&twin, "GET", "/api/v1/cars/VIN-E3", None).await;
    assert_eq!(
        view["id"], "VIN-E3",
        "the car stays, only its old events go"
    );
}

#[tokio::test]
async fn reports_over_the_rate_limit_are_dropped_and_counted() {
    let env = Env::new();
    let mut config = env.config();
    config.report_rate_per_sec = 0.001;
    config.report_burst = 5;
    let twin = env.start_with(config).await;
    let files = register(&env, &twin, "VIN-E4").await;
    let link = connected(&env, &twin, &files, "VIN-E4").await;
    for seq in 0..50 {
        send_event(&link, seq + 1, "spam", &format!("s{seq}")).await;
    }
    until("45 dropped reports", || async {
        api(&twin, "GET", "/api/v1/cars/VIN-E4", None).await.1["dropped_reports"] == 45
    })
    .await;
    let kept: Vec<Value> = events_of_kind(&twin, "VIN-E4", "spam")
        .await
        .into_iter()
        .map(|e| e["message"].clone())
        .collect();
    assert_eq!(
        kept,
        (0..5).map(|i| json!(format!("s{i}"))).collect::<Vec<_>>()
    );
    // The connection is fine: request-response is not rate-limited.
    hello(&link).await.unwrap();
}

#[tokio::test]
async fn events_are_paged_back_in_time_with_next_before() {
    let env = Env::new();
    let twin = env.start_with(env.config()).await;
    let files = register(&env, &twin, "VIN-E5").await;
    let link = connected(&env, &twin, &files, "VIN-E5").await;
    for seq in 0..25 {
        send_event(&link, seq + 1, "page", &format!("p{seq}")).await;
    }
    until("25 events", || async {
        events_of_kind(&twin, "VIN-E5", "page").await.len() == 25
    })
    .await;
    let mut pages = Vec::new();
    let mut path = "/api/v1/cars/VIN-E5/events?limit=10".to_owned();
    loop {
        let (status, page) = api(&twin, "GET", &path, None).await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap().clone();
        assert!(events.len() <= 10);
        let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
        pages.push(events);
        match page["next_before"].as_i64() {
            Some(before) => {
                assert_eq!(before, ids[0], "the next page is older than this one");
                path = format!("/api/v1/cars/VIN-E5/events?limit=10&before={before}");
            }
            None => break,
        }
    }
    let all: Vec<Value> = pages.into_iter().rev().flatten().collect();
    assert_eq!(all, all_events(&twin, "VIN-E5").await);

    for (query, status) in [("limit=0", 400), ("limit=x", 400), ("colour=red", 400)] {
        let (got, body) = api(
            &twin,
            "GET",
            &format!("/api/v1/cars/VIN-E5/events?{query}"),
            None,
        )
        .await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body["error"].is_string(), "{query}: {body}");
    }
    let (status, page) = api(&twin, "GET", "/api/v1/cars/VIN-E5/events?limit=5000", None).await;
    assert_eq!(status, 200, "a large limit is cut to a page: {page}");
}
