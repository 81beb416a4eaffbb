use super::*;

fn env(usec: Option<&str>, pid: Option<&str>) -> WatchdogEnv {
    WatchdogEnv::from_vars(usec.map(OsStr::new), pid.map(OsStr::new), 4242)
}

fn invalid(variable: &str) -> impl Fn(&WatchdogEnv) -> bool + '_ {
    move |e| matches!(e, WatchdogEnv::Invalid { variable: v, .. } if *v == variable)
}

#[test]
fn a_watchdog_timeout_for_this_process_pings_at_half_of_it() {
    let half = WatchdogEnv::Ping {
        interval: Duration::from_millis(100),
    };
    assert_eq!(env(Some("200000"), None), half);
    assert_eq!(env(Some("200000"), Some("4242")), half);
    assert_eq!(
        env(Some("30000000"), None),
        WatchdogEnv::Ping {
            interval: Duration::from_secs(15)
        }
    );
}

#[test]
fn no_watchdog_timeout_means_no_watchdog_whatever_the_pid_says() {
    assert_eq!(env(None, None), WatchdogEnv::Off);
    assert_eq!(env(None, Some("4242")), WatchdogEnv::Off);
    assert_eq!(env(None, Some("garbage")), WatchdogEnv::Off);
}

#[test]
fn a_watchdog_meant_for_another_process_is_not_pinged() {
    assert_eq!(
        env(Some("200000"), Some("1")),
        WatchdogEnv::OtherProcess { pid: 1 }
    );
}

#[test]
fn zero_or_non_numeric_watchdog_timeouts_are_invalid() {
    let usec = invalid("WATCHDOG_USEC");
    for value in [
        "0",
        "",
        "abc",
        "-5",
        "+5",
        " 200000",
        "1.5",
        "99999999999999999999",
    ] {
        let decided = env(Some(value), None);
        assert!(usec(&decided), "WATCHDOG_USEC={value:?} gave {decided:?}");
    }
    // The timeout is judged first, as sd_watchdog_enabled does.
    assert!(usec(&env(Some("0"), Some("1"))));
}

#[test]
fn a_watchdog_pid_that_is_no_pid_is_invalid() {
    let pid = invalid("WATCHDOG_PID");
    for value in ["0", "", "x", "-1", "4294967296"] {
        let decided = env(Some("200000"), Some(value));
        assert!(pid(&decided), "WATCHDOG_PID={value:?} gave {decided:?}");
    }
}

#[test]
fn a_tiny_watchdog_timeout_does_not_make_the_pings_spin() {
    assert_eq!(
        env(Some("1"), None),
        WatchdogEnv::Ping { interval: MIN_PING }
    );
}

#[test]
fn an_invalid_watchdog_or_one_for_another_process_starts_no_pings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let _receiver = UnixDatagram::bind(&path).unwrap();
    for watchdog in [
        env(Some("0"), None),
        env(Some("abc"), None),
        env(Some("200000"), Some("1")),
        env(None, None),
    ] {
        let notifier = Notifier::new(path.as_os_str(), watchdog.clone());
        assert_eq!(notifier.watchdog_interval(), None, "{watchdog:?}");
    }
    let notifier = Notifier::new(path.as_os_str(), env(Some("200000"), None));
    assert_eq!(
        notifier.watchdog_interval(),
        Some(Duration::from_millis(100))
    );
}

#[test]
fn without_a_notify_socket_nothing_is_sent_and_no_watchdog_runs() {
    let notifier = Notifier::default();
    assert_eq!(notifier.watchdog_interval(), None);
    notifier.ready("up");
    notifier.stopping();
}

fn received(receiver: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = receiver.recv(&mut buf).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn each_state_is_one_datagram_of_key_value_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let receiver = UnixDatagram::bind(&path).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let notifier = Notifier::new(path.as_os_str(), WatchdogEnv::Off);
    notifier.ready("offline,\nretrying");
    notifier.status("connected to the twin");
    notifier.stopping();
    assert_eq!(received(&receiver), "READY=1\nSTATUS=offline, retrying");
    assert_eq!(received(&receiver), "STATUS=connected to the twin");
    assert_eq!(received(&receiver), "STOPPING=1\nSTATUS=stopping");
}

#[test]
fn an_at_sign_names_an_abstract_socket() {
    let name = format!("cardeploy-notify-test-{}", std::process::id());
    let receiver =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let notifier = Notifier::new(OsStr::new(&format!("@{name}")), WatchdogEnv::Off);
    notifier.ready("up");
    assert_eq!(received(&receiver), "READY=1\nSTATUS=up");
}

#[test]
fn a_socket_that_is_gone_or_malformed_is_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let gone = Notifier::new(dir.path().join("absent").as_os_str(), WatchdogEnv::Off);
    gone.ready("up");
    gone.stopping();
    let relative = Notifier::new(OsStr::new("run/notify"), WatchdogEnv::Off);
    assert!(relative.socket.is_none());
    relative.ready("up");
}

#[tokio::test]
async fn the_watchdog_task_pings_until_its_guard_drops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let receiver = UnixDatagram::bind(&path).unwrap();
    receiver.set_nonblocking(true).unwrap();
    let drain = || {
        let mut pings = 0;
        let mut buf = [0u8; 64];
        while let Ok(n) = receiver.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1");
            pings += 1;
        }
        pings
    };
    let notifier = Notifier::new(path.as_os_str(), env(Some("200000"), None));
    let watchdog = notifier.start_watchdog().unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    drop(watchdog);
    // Every 100 ms from the start: 4 on an idle machine, other counts on a busy one.
    let pings = drain();
    assert!(pings >= 2, "{pings} pings in 350 ms");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(drain(), 0, "pings after the guard dropped");
}
