//! The statistics the benchmarks report: medians, nearest-rank percentiles, and seconds as the
//! tables print them.

/// The median of `values`; `None` when there are none.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// The nearest-rank percentile `p` (0 to 1) of the finite values; NaN when there are none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// `v` seconds with two decimals and `unit` after them, or "–" where there is no value (NaN,
/// infinite).
pub fn secs(v: f64, unit: &str) -> String {
    if v.is_finite() {
        format!("{v:.2}{unit}")
    } else {
        "–".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let values = [5.0, f64::NAN, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&values, 0.5), 3.0);
        assert_eq!(percentile(&values, 1.0), 5.0);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert!(percentile(&[f64::NAN], 0.5).is_nan());
        assert_eq!(secs(1.234, " s"), "1.23 s");
        assert_eq!(secs(f64::NAN, " s"), "–");
    }
}
