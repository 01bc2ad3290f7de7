//! A small terminal bar chart of a series: one column per point (or per group of points when
//! there are more than fit), bars drawn with the eighth-block characters `▁▂▃▄▅▆▇█` and scaled
//! so the largest column fills the chart's height. Never wider than [`MAX_WIDTH`] columns.

/// The widest chart, in terminal columns.
pub const MAX_WIDTH: usize = 60;

/// The default chart height, in terminal rows.
pub const HEIGHT: usize = 6;

/// Block characters by filled eighths of a row, 0 to 8.
const BLOCKS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Groups `values` into at most `max_width` columns: each column sums `per_column` consecutive
/// values (the last column may hold fewer). Returns the columns and `per_column`.
pub fn columns(values: &[u64], max_width: usize) -> (Vec<u64>, usize) {
    let max_width = max_width.max(1);
    let per_column = values.len().div_ceil(max_width).max(1);
    let columns = values
        .chunks(per_column)
        .map(|chunk| chunk.iter().fold(0u64, |sum, v| sum.saturating_add(*v)))
        .collect();
    (columns, per_column)
}

/// The bar of `value` in eighths of a row, `0..=height * 8`: `max` fills the height, zero is
/// empty, and any value above zero shows at least one eighth.
pub fn scale(value: u64, max: u64, height: usize) -> usize {
    if max == 0 || value == 0 {
        return 0;
    }
    let full = height as u128 * 8;
    let eighths = (u128::from(value.min(max)) * full + u128::from(max) / 2) / u128::from(max);
    usize::try_from(eighths).unwrap_or(usize::MAX).max(1)
}

/// Draws `columns` as `height` rows of block characters, top row first, each row exactly as wide
/// as there are columns.
pub fn render(columns: &[u64], height: usize) -> Vec<String> {
    let max = columns.iter().copied().max().unwrap_or(0);
    let bars: Vec<usize> = columns.iter().map(|v| scale(*v, max, height)).collect();
    (0..height)
        .rev()
        .map(|row| {
            bars.iter()
                .map(|eighths| BLOCKS[eighths.saturating_sub(row * 8).min(8)])
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_fills_the_height_at_the_max() {
        assert_eq!(scale(10, 10, 6), 48);
        assert_eq!(scale(5, 10, 6), 24);
        assert_eq!(scale(0, 10, 6), 0);
        assert_eq!(scale(0, 0, 6), 0);
        // Tiny but non-zero values stay visible.
        assert_eq!(scale(1, 1_000_000, 6), 1);
        // Rounds to the nearest eighth.
        assert_eq!(scale(3, 48, 6), 3);
        assert_eq!(scale(u64::MAX, u64::MAX, 6), 48);
        assert_eq!(scale(u64::MAX / 2, u64::MAX, 1), 4);
    }

    #[test]
    fn columns_never_exceed_the_width() {
        let values: Vec<u64> = (0..10_000).collect();
        let (cols, per) = columns(&values, MAX_WIDTH);
        assert!(cols.len() <= MAX_WIDTH);
        assert_eq!(per, 167);
        assert_eq!(cols.iter().sum::<u64>(), values.iter().sum::<u64>());
        let (cols, per) = columns(&[1, 2, 3], MAX_WIDTH);
        assert_eq!((cols, per), (vec![1, 2, 3], 1));
        let (cols, per) = columns(&[1; 61], MAX_WIDTH);
        assert_eq!(per, 2);
        assert_eq!(cols.len(), 31);
        assert_eq!(columns(&[], MAX_WIDTH).0, Vec::<u64>::new());
    }

    #[test]
    fn rendering() {
        let rows = render(&[0, 1, 2, 4, 8], 1);
        assert_eq!(rows, vec![" ▁▂▄█".to_owned()]);
        let rows = render(&[2, 1, 0], 2);
        assert_eq!(rows, vec!["█  ".to_owned(), "██ ".to_owned()]);
        let rows = render(&[0, 0], 3);
        assert!(rows.iter().all(|r| r == "  "));
        let rows = render(&[3, 5], HEIGHT);
        assert_eq!(rows.len(), HEIGHT);
        assert_eq!(rows[0], " █");
        assert!(rows.iter().all(|r| r.chars().count() == 2));
    }
}
