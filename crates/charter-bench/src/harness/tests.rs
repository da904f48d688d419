use std::time::Duration;

use super::{median, percentile, Latency};

fn ms(values: impl IntoIterator<Item = u64>) -> Vec<Duration> {
    values.into_iter().map(Duration::from_millis).collect()
}

#[test]
fn percentile_uses_nearest_rank() {
    let one_to_hundred = ms(1..=100);
    let check = |samples: &[Duration], p: f64, expected: Option<u64>| {
        assert_eq!(
            percentile(samples, p),
            expected.map(Duration::from_millis),
            "p{p} of {} samples",
            samples.len()
        );
    };
    check(&one_to_hundred, 50.0, Some(50));
    check(&one_to_hundred, 99.0, Some(99));
    check(&one_to_hundred, 100.0, Some(100));
    check(&one_to_hundred, 0.5, Some(1));
    check(&ms(1..=200), 99.0, Some(198));
    check(&ms([7]), 50.0, Some(7));
    check(&ms([7]), 99.0, Some(7));
    check(&ms([1, 2]), 50.0, Some(1));
    check(&ms([1, 2, 3]), 50.0, Some(2));
    check(&[], 50.0, None);
    check(&one_to_hundred, 0.0, None);
    check(&one_to_hundred, 101.0, None);
    check(&one_to_hundred, f64::NAN, None);
}

#[test]
fn median_of_odd_and_even_counts() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    assert_eq!(median(&[5.0]), Some(5.0));
    assert_eq!(median(&[]), None);
}

#[test]
fn latency_summary_sorts_its_samples() {
    let summary = Latency::of(&ms([30, 10, 20, 40])).expect("samples");
    assert_eq!(summary.count, 4);
    assert_eq!(summary.p50, Duration::from_millis(20));
    assert_eq!(summary.p99, Duration::from_millis(40));
    assert_eq!(summary.mean, Duration::from_millis(25));
    assert_eq!(summary.max, Duration::from_millis(40));
    assert!(Latency::of(&[]).is_none());
}
