//! Reading the Prometheus text exposition the servers write on `/metrics` (what `opsctl`,
//! `ops-bench` and the tests read back).

/// The sum of every sample of metric `name`, whatever its labels.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of one series, written whole: `name` alone, or `name{labels}` as the server
/// writes them.
pub fn series(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
}

#[cfg(test)]
mod tests {
    const TEXT: &str = "# TYPE ops_x_total counter\n\
        ops_x_total{result=\"ok\"} 3\n\
        ops_x_total{result=\"bad\"} 2\n\
        ops_x_total_more 100\n\
        ops_y 7.5\n";

    #[test]
    fn sums_every_label_set_of_a_name_and_nothing_else() {
        assert_eq!(super::sum(TEXT, "ops_x_total"), 5.0);
        assert_eq!(super::sum(TEXT, "ops_y"), 7.5);
        assert_eq!(super::sum(TEXT, "ops_z"), 0.0);
    }

    #[test]
    fn reads_one_series_whole() {
        assert_eq!(super::series(TEXT, "ops_x_total{result=\"bad\"}"), Some(2.0));
        assert_eq!(super::series(TEXT, "ops_y"), Some(7.5));
        assert_eq!(super::series(TEXT, "ops_x_total"), None, "a labelled name is no series alone");
        assert_eq!(super::series(TEXT, "ops_x"), None);
    }
}
