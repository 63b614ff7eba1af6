//! What `compare` writes: `samples.csv`, `fds.svg` and `report.md`, from the samples alone.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use plotters::prelude::*;

/// One variant's state at one second.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: u64,
    /// `correct` or `leaky`.
    pub variant: &'static str,
    /// Open fds of the server process.
    pub fds: usize,
    /// Its sockets in CLOSE_WAIT.
    pub close_wait: usize,
    /// Of those, the ones already in CLOSE_WAIT at the previous sample (same inode): left
    /// unclosed for a whole interval, not merely caught between a FIN and its close.
    pub close_wait_lingering: usize,
    /// Requests answered, in total so far.
    pub ok: u64,
    /// Requests failed, in total so far.
    pub failed: u64,
    /// Connects failed, in total so far.
    pub connect_failed: u64,
    /// Peer closes (sessions ended on purpose), in total so far.
    pub sessions: u64,
    /// Median round trip in this second, µs (0 if no request completed).
    pub p50_us: u64,
    /// 99th percentile round trip in this second, µs.
    pub p99_us: u64,
    /// Whether the server has logged `Too many open files` by now.
    pub accept_failing: bool,
}

/// The CSV header, matching [`csv_row`].
pub const CSV_HEADER: &str =
    "t_s,variant,fds,close_wait,close_wait_lingering,requests_ok,requests_failed,connects_failed,peer_closes,p50_us,p99_us,accept_failing";

/// One CSV line (no newline).
pub fn csv_row(s: &Sample) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{}",
        s.t,
        s.variant,
        s.fds,
        s.close_wait,
        s.close_wait_lingering,
        s.ok,
        s.failed,
        s.connect_failed,
        s.sessions,
        s.p50_us,
        s.p99_us,
        u8::from(s.accept_failing)
    )
}

/// The end-of-run figures for one variant.
#[derive(Clone, Debug)]
pub struct Summary {
    /// `correct` or `leaky`.
    pub variant: &'static str,
    /// Highest fd count sampled.
    pub peak_fds: usize,
    /// Highest CLOSE_WAIT count sampled.
    pub peak_close_wait: usize,
    /// Requests answered.
    pub ok: u64,
    /// Requests failed.
    pub failed: u64,
    /// Connects failed.
    pub connect_failed: u64,
    /// Peer closes.
    pub sessions: u64,
    /// Median and 99th percentile round trip over the run, µs.
    pub p50_us: u64,
    /// See `p50_us`.
    pub p99_us: u64,
    /// First second at which the server's log showed `Too many open files`.
    pub first_emfile_s: Option<u64>,
    /// Most CLOSE_WAIT sockets seen in two consecutive samples (the same sockets).
    pub peak_lingering: usize,
    /// First second at which a CLOSE_WAIT socket had been there since the previous sample.
    pub first_lingering_s: Option<u64>,
    /// Open fds once every client had left (filled in by the caller).
    pub fds_after: usize,
    /// CLOSE_WAIT sockets once every client had left (filled in by the caller).
    pub close_wait_after: usize,
}

/// Summarise one variant's samples (in time order).
pub fn summarise(variant: &'static str, samples: &[&Sample], p50_us: u64, p99_us: u64) -> Summary {
    let last = samples.last();
    Summary {
        variant,
        peak_fds: samples.iter().map(|s| s.fds).max().unwrap_or(0),
        peak_close_wait: samples.iter().map(|s| s.close_wait).max().unwrap_or(0),
        ok: last.map_or(0, |s| s.ok),
        failed: last.map_or(0, |s| s.failed),
        connect_failed: last.map_or(0, |s| s.connect_failed),
        sessions: last.map_or(0, |s| s.sessions),
        p50_us,
        p99_us,
        first_emfile_s: samples.iter().find(|s| s.accept_failing).map(|s| s.t),
        peak_lingering: samples
            .iter()
            .map(|s| s.close_wait_lingering)
            .max()
            .unwrap_or(0),
        first_lingering_s: samples
            .iter()
            .find(|s| s.close_wait_lingering > 0)
            .map(|s| s.t),
        fds_after: 0,
        close_wait_after: 0,
    }
}

/// The results table, in Markdown (also what the terminal shows).
pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| variant | peak fds | peak CLOSE_WAIT | of which left open ≥ 1 sample | fds after clients left | CLOSE_WAIT after clients left | requests ok | requests failed | connects failed | peer closes | p50 µs | p99 µs | first `Too many open files` |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for s in summaries {
        let emfile = s
            .first_emfile_s
            .map_or("never".to_string(), |t| format!("after {t} s"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.variant,
            s.peak_fds,
            s.peak_close_wait,
            s.peak_lingering,
            s.fds_after,
            s.close_wait_after,
            s.ok,
            s.failed,
            s.connect_failed,
            s.sessions,
            s.p50_us,
            s.p99_us,
            emfile
        );
    }
    out
}

/// One line of the chart: which variant, its legend, the value plotted, its colour, its width.
type Series = (
    &'static str,
    &'static str,
    fn(&Sample) -> usize,
    RGBColor,
    u32,
);

/// Colours of the chart: the leak in warm colours, the fix in cool ones.
const LEAKY_FDS: RGBColor = RGBColor(200, 30, 30);
const LEAKY_CLOSE_WAIT: RGBColor = RGBColor(240, 150, 40);
const CORRECT_FDS: RGBColor = RGBColor(30, 80, 200);
const CORRECT_CLOSE_WAIT: RGBColor = RGBColor(20, 160, 80);
const EMFILE_MARK: RGBColor = RGBColor(120, 0, 0);

/// Room below 0 on the y axis, as a share of its height: a series at 0 (the correct
/// server's CLOSE_WAIT) would otherwise be drawn on the x axis and hidden by it.
const BELOW_ZERO: f64 = 0.04;

/// A legend sample that looks like the dashed line it stands for: two short dashes.
fn dashed_sample<'a, DB: DrawingBackend + 'a>(
    x: i32,
    y: i32,
    color: RGBColor,
) -> impl IntoDynElement<'a, DB, (i32, i32)> {
    EmptyElement::at((x, y))
        + PathElement::new(vec![(0, 0), (8, 0)], color.stroke_width(2))
        + PathElement::new(vec![(12, 0), (20, 0)], color.stroke_width(2))
}

/// Draw fd counts and CLOSE_WAIT counts of both variants over time, with the fd limit and
/// the leaky variant's first `Too many open files`.
pub fn draw_svg(path: &Path, samples: &[Sample], nofile: u64) -> io::Result<()> {
    draw(path, samples, nofile)
        .map_err(|e| io::Error::other(format!("drawing {}: {e}", path.display())))
}

fn draw(path: &Path, samples: &[Sample], nofile: u64) -> Result<(), Box<dyn std::error::Error>> {
    let t_max = samples.iter().map(|s| s.t).max().unwrap_or(1).max(1) as f64;
    let y_max = nofile as f64 * 1.2;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "closewait and its leaky variant under the same load, each with RLIMIT_NOFILE={nofile}"
            ),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..t_max, -y_max * BELOW_ZERO..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("open fds / sockets in CLOSE_WAIT")
        // Seconds and counts are whole numbers; plotters would print "1000.0". No labels
        // below 0: that room only keeps the 0 line off the axis.
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if *y < 0.0 {
                String::new()
            } else {
                format!("{y:.0}")
            }
        })
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let series: [Series; 4] = [
        (
            "leaky",
            "leaky variant (ignores the peer's FIN): open fds",
            |s| s.fds,
            LEAKY_FDS,
            3,
        ),
        (
            "leaky",
            "leaky variant: sockets in CLOSE_WAIT (peer gone, never closed)",
            |s| s.close_wait,
            LEAKY_CLOSE_WAIT,
            2,
        ),
        (
            "correct",
            "closewait: open fds (its own + the clients connected now)",
            |s| s.fds,
            CORRECT_FDS,
            3,
        ),
        (
            "correct",
            "closewait: sockets in CLOSE_WAIT",
            |s| s.close_wait,
            CORRECT_CLOSE_WAIT,
            3,
        ),
    ];
    for (variant, label, value, color, width) in series {
        let points: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.variant == variant)
            .map(|s| (s.t as f64, value(s) as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(width)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
            });
    }
    // Dashed and drawn last, so where the leaky fds line reaches the limit and stays on it,
    // both stay visible: red under black dashes.
    let limit = nofile as f64;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(0.0, limit), (t_max, limit)],
            8,
            6,
            BLACK.stroke_width(2),
        ))?
        .label(format!(
            "fd limit (RLIMIT_NOFILE = {nofile}): accept fails here"
        ))
        .legend(|(x, y)| dashed_sample(x, y, BLACK));
    let first_emfile = samples
        .iter()
        .find(|s| s.variant == "leaky" && s.accept_failing)
        .map(|s| s.t as f64);
    if let Some(t) = first_emfile {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(t, 0.0), (t, y_max)],
                4,
                4,
                EMFILE_MARK.stroke_width(2),
            ))?
            .label(format!(
                "leaky variant logs 'Too many open files' ({t:.0} s): new clients wait forever"
            ))
            .legend(|(x, y)| dashed_sample(x, y, EMFILE_MARK));
        chart.draw_series(std::iter::once(Text::new(
            format!("{t:.0} s: accept fails (EMFILE)"),
            // Just right of the mark, above the limit line.
            (t + t_max * 0.01, y_max * 0.96),
            ("sans-serif", 15).into_font().color(&EMFILE_MARK),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: u64, close_wait: usize, lingering: usize, accept_failing: bool) -> Sample {
        Sample {
            t,
            variant: "leaky",
            fds: 10 + close_wait,
            close_wait,
            close_wait_lingering: lingering,
            ok: t * 100,
            failed: 0,
            connect_failed: 0,
            sessions: t * 3,
            p50_us: 50,
            p99_us: 90,
            accept_failing,
        }
    }

    #[test]
    fn csv_rows_match_the_header() {
        let row = csv_row(&sample(3, 7, 5, true));
        assert_eq!(row, "3,leaky,17,7,5,300,0,0,9,50,90,1");
        assert_eq!(row.split(',').count(), CSV_HEADER.split(',').count());
    }

    #[test]
    fn summary_finds_peaks_the_first_emfile_and_the_first_lingering_socket() {
        let samples = [
            sample(1, 0, 0, false),
            sample(2, 4, 0, false),
            sample(3, 9, 4, true),
            sample(4, 0, 0, true),
            sample(5, 2, 0, true),
        ];
        let refs: Vec<&Sample> = samples.iter().collect();
        let s = summarise("leaky", &refs, 1, 2);
        assert_eq!((s.peak_close_wait, s.peak_fds), (9, 19));
        assert_eq!(s.first_emfile_s, Some(3));
        assert_eq!((s.first_lingering_s, s.peak_lingering), (Some(3), 4));
        assert!(table(&[s]).contains("after 3 s"));
    }

    #[test]
    fn close_wait_in_consecutive_samples_is_not_lingering_unless_the_same_sockets() {
        // Two different sockets each caught between FIN and close: the correct server's
        // normal churn, which a count-based rule would have called a linger.
        let samples = [sample(1, 1, 0, false), sample(2, 1, 0, false)];
        let refs: Vec<&Sample> = samples.iter().collect();
        let s = summarise("correct", &refs, 1, 2);
        assert_eq!((s.first_lingering_s, s.peak_lingering), (None, 0));
    }
}
