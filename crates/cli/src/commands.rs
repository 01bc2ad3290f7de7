//! The request/response subcommands: `hit`, `get`, `series`, `top`, `watch` and `health`. Each
//! connects, makes one call and prints the answer as text or JSON.

use std::time::Duration;

use hitcounter_client::{AuthChannel, Bearer};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsRequest, GetHitsResponse,
    GetSeriesRequest, RecordHitRequest, TopKeysRequest, WatchHitsRequest,
};
use serde_json::json;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::{
    address::{connect, Address},
    chart,
    cli::{GetArgs, HealthArgs, HitArgs, SeriesArgs, TopArgs, WatchArgs},
    error::CliError,
    output::{pad_left, Printer},
    time::{format_seconds, format_time, now_ms},
    Outcome,
};

/// Connect timeout of the ordinary commands.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The interceptor sending `--token`, if one was given.
fn bearer(token: Option<&str>) -> Result<Bearer, CliError> {
    Bearer::new(token).map_err(|e| CliError::Usage(format!("--token: {e}")))
}

async fn ingest(
    address: &Address,
    token: Option<&str>,
) -> Result<IngestClient<AuthChannel>, CliError> {
    let bearer = bearer(token)?;
    Ok(IngestClient::with_interceptor(
        connect(address, "ingest", CONNECT_TIMEOUT).await?,
        bearer,
    ))
}

async fn query(
    address: &Address,
    token: Option<&str>,
) -> Result<QueryClient<AuthChannel>, CliError> {
    let bearer = bearer(token)?;
    Ok(QueryClient::with_interceptor(
        connect(address, "query", CONNECT_TIMEOUT).await?,
        bearer,
    ))
}

/// `hitctl hit`.
pub(crate) async fn hit(
    address: &Address,
    token: Option<&str>,
    args: HitArgs,
    out: Printer,
) -> Result<Outcome, CliError> {
    let timestamp_ms = args.at.map_or(0, |at| at.resolve_now());
    let accepted = ingest(address, token)
        .await?
        .record_hit(RecordHitRequest {
            key: args.key.clone(),
            timestamp_ms,
            count: args.count,
        })
        .await?
        .into_inner()
        .accepted;
    if out.json() {
        out.document(&json!({
            "key": args.key,
            "accepted": accepted,
            "timestamp_ms": (timestamp_ms != 0).then_some(timestamp_ms),
        }))?;
    } else {
        let when = if timestamp_ms == 0 {
            String::new()
        } else {
            format!(" at {}", format_time(timestamp_ms))
        };
        out.line(&format!(
            "accepted {accepted} {} of {}{when}",
            plural(accepted, "hit", "hits"),
            args.key
        ))?;
    }
    Ok(Outcome::Success)
}

/// `hitctl get`.
pub(crate) async fn get(
    address: &Address,
    token: Option<&str>,
    args: GetArgs,
    out: Printer,
) -> Result<Outcome, CliError> {
    let response = query(address, token)
        .await?
        .get_hits(GetHitsRequest {
            key: args.key,
            window_seconds: args.window,
            at_ms: args.at.map_or(0, |at| at.resolve_now()),
        })
        .await?
        .into_inner();
    if out.json() {
        out.document(&hits_json(&response))?;
    } else {
        out.line(&hits_line(&response))?;
    }
    Ok(Outcome::Success)
}

fn hits_json(response: &GetHitsResponse) -> serde_json::Value {
    json!({
        "key": response.key,
        "count": response.count,
        "window_seconds": response.window_seconds,
        "window": format_seconds(u64::from(response.window_seconds)),
        "at_ms": response.at_ms,
        "at": format_time(response.at_ms),
    })
}

fn hits_line(response: &GetHitsResponse) -> String {
    format!(
        "{}: {} {} in the {} up to {}",
        response.key,
        response.count,
        plural(response.count, "hit", "hits"),
        format_seconds(u64::from(response.window_seconds)),
        format_time(response.at_ms)
    )
}

fn plural<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// Round steps, in seconds, for the automatic `--step`.
const ROUND_STEPS: [u32; 15] = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21_600,
];

/// The smallest round step that keeps a range of `range_ms` within one chart width of points
/// (counting one extra point for the alignment of the first one).
pub(crate) fn auto_step(range_ms: i64) -> u32 {
    let range_s = u64::try_from(range_ms.max(0)).unwrap_or(0).div_ceil(1000);
    let columns = (chart::MAX_WIDTH - 1) as u64;
    let needed = range_s.div_ceil(columns).max(1);
    ROUND_STEPS
        .iter()
        .copied()
        .find(|step| u64::from(*step) >= needed)
        .unwrap_or_else(|| u32::try_from(needed).unwrap_or(u32::MAX))
}

/// `hitctl series`.
pub(crate) async fn series(
    address: &Address,
    token: Option<&str>,
    args: SeriesArgs,
    out: Printer,
) -> Result<Outcome, CliError> {
    let now = now_ms();
    let (from_ms, to_ms) = (args.from.resolve(now), args.to.resolve(now));
    if to_ms <= from_ms {
        return Err(CliError::Usage(format!(
            "--to ({}) must be after --from ({})",
            format_time(to_ms),
            format_time(from_ms)
        )));
    }
    let step_seconds = args.step.unwrap_or_else(|| auto_step(to_ms - from_ms));
    let response = query(address, token)
        .await?
        .get_series(GetSeriesRequest {
            key: args.key,
            from_ms,
            to_ms,
            step_seconds,
        })
        .await?
        .into_inner();
    let counts: Vec<u64> = response.points.iter().map(|p| p.count).collect();
    let total = counts.iter().fold(0u64, |sum, c| sum.saturating_add(*c));
    let max = counts.iter().copied().max().unwrap_or(0);
    if out.json() {
        let points: Vec<_> = response
            .points
            .iter()
            .map(|p| json!({"start_ms": p.start_ms, "start": format_time(p.start_ms), "count": p.count}))
            .collect();
        out.document(&json!({
            "key": response.key,
            "step_seconds": response.step_seconds,
            "from_ms": from_ms,
            "to_ms": to_ms,
            "total": total,
            "max": max,
            "points": points,
        }))?;
        return Ok(Outcome::Success);
    }
    let step = format_seconds(u64::from(response.step_seconds));
    out.line(&format!(
        "{}: {} points of {step} from {} to {}, total {total}, max {max}",
        response.key,
        response.points.len(),
        format_time(from_ms),
        format_time(to_ms),
    ))?;
    let width = max.to_string().len();
    for point in &response.points {
        out.line(&format!(
            "{}  {}",
            format_time(point.start_ms),
            pad_left(&point.count.to_string(), width)
        ))?;
    }
    for line in chart_lines(
        &counts,
        &step,
        response.points.first().map(|p| p.start_ms),
        response.points.last().map(|p| p.start_ms),
    ) {
        out.line(&line)?;
    }
    Ok(Outcome::Success)
}

/// The chart under a series: a caption, the bars, a base line and the time range.
pub(crate) fn chart_lines(
    counts: &[u64],
    step: &str,
    first_ms: Option<i64>,
    last_ms: Option<i64>,
) -> Vec<String> {
    let (Some(first_ms), Some(last_ms)) = (first_ms, last_ms) else {
        return Vec::new();
    };
    let (columns, per_column) = chart::columns(counts, chart::MAX_WIDTH);
    let column_max = columns.iter().copied().max().unwrap_or(0);
    let per = if per_column == 1 {
        format!("1 column = {step}")
    } else {
        format!("1 column = {per_column} × {step}, summed")
    };
    let mut lines = vec![
        String::new(),
        format!("max {column_max} per column ({per})"),
    ];
    if column_max == 0 {
        lines.push("(no hits in this range)".to_owned());
    } else {
        lines.extend(chart::render(&columns, chart::HEIGHT));
    }
    lines.push("─".repeat(columns.len()));
    lines.push(format!(
        "{} … {}",
        format_time(first_ms),
        format_time(last_ms)
    ));
    lines
}

/// `hitctl top`.
pub(crate) async fn top(
    address: &Address,
    token: Option<&str>,
    args: TopArgs,
    out: Printer,
) -> Result<Outcome, CliError> {
    let response = query(address, token)
        .await?
        .top_keys(TopKeysRequest {
            window_seconds: args.window,
            limit: args.limit,
            prefix: args.prefix.clone(),
            at_ms: args.at.map_or(0, |at| at.resolve_now()),
        })
        .await?
        .into_inner();
    let window = format_seconds(u64::from(response.window_seconds));
    if out.json() {
        let keys: Vec<_> = response
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| json!({"rank": i + 1, "key": k.key, "count": k.count}))
            .collect();
        out.document(&json!({
            "window_seconds": response.window_seconds,
            "window": window,
            "at_ms": response.at_ms,
            "at": format_time(response.at_ms),
            "prefix": args.prefix,
            "approximate": response.approximate,
            "keys": keys,
        }))?;
        return Ok(Outcome::Success);
    }
    let prefix = if args.prefix.is_empty() {
        String::new()
    } else {
        format!(" starting with `{}`", args.prefix)
    };
    let exact = if response.approximate {
        "approximate"
    } else {
        "exact"
    };
    if response.keys.is_empty() {
        out.line(&format!(
            "no keys{prefix} with hits in the {window} up to {}",
            format_time(response.at_ms)
        ))?;
        return Ok(Outcome::Success);
    }
    out.line(&format!(
        "top {} {}{prefix} in the {window} up to {} ({exact})",
        response.keys.len(),
        plural(response.keys.len() as u64, "key", "keys"),
        format_time(response.at_ms)
    ))?;
    let rank_width = response.keys.len().to_string().len().max(1);
    let count_width = response
        .keys
        .iter()
        .map(|k| k.count.to_string().len())
        .max()
        .unwrap_or(0)
        .max("COUNT".len());
    out.line(&format!(
        "{}  {}  KEY",
        pad_left("#", rank_width),
        pad_left("COUNT", count_width)
    ))?;
    for (i, key) in response.keys.iter().enumerate() {
        out.line(&format!(
            "{}  {}  {}",
            pad_left(&(i + 1).to_string(), rank_width),
            pad_left(&key.count.to_string(), count_width),
            key.key
        ))?;
    }
    Ok(Outcome::Success)
}

/// `hitctl watch`: prints every update until Ctrl-C or the end of the stream.
pub(crate) async fn watch(
    address: &Address,
    token: Option<&str>,
    args: WatchArgs,
    out: Printer,
) -> Result<Outcome, CliError> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut updates = query(address, token)
        .await?
        .watch_hits(WatchHitsRequest {
            key: args.key,
            window_seconds: args.window,
            interval_ms: args.interval,
        })
        .await?
        .into_inner();
    let live = out.live();
    let mut printed = false;
    let result = loop {
        let update = tokio::select! {
            _ = &mut ctrl_c => break Ok(()),
            update = updates.message() => update,
        };
        let printed_now = match update {
            Ok(Some(response)) if out.json() => out.document(&hits_json(&response)),
            Ok(Some(response)) if live => out.rewrite(&hits_line(&response)),
            Ok(Some(response)) => out.line(&hits_line(&response)),
            Ok(None) => break Ok(()),
            Err(status) => break Err(CliError::Status(status)),
        };
        printed_now?;
        printed = true;
    };
    if live && printed {
        out.line("")?;
    }
    result.map(|()| Outcome::Success)
}

/// `hitctl health`: SERVING → success; anything else → failure (exit code 1).
pub(crate) async fn health(
    address: &Address,
    token: Option<&str>,
    name: &str,
    args: HealthArgs,
    out: Printer,
) -> Result<Outcome, CliError> {
    let bearer = bearer(token)?;
    let channel = connect(address, name, args.timeout).await?;
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    request.set_timeout(args.timeout);
    let status = HealthClient::with_interceptor(channel, bearer)
        .check(request)
        .await?
        .into_inner()
        .status;
    let name = ServingStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    if out.json() {
        out.document(&json!({
            "address": address.to_string(),
            "service": args.service,
            "status": name,
        }))?;
    } else if args.service.is_empty() {
        out.line(&format!("{address}: {name}"))?;
    } else {
        out.line(&format!("{address} {}: {name}", args.service))?;
    }
    Ok(if status == ServingStatus::Serving as i32 {
        Outcome::Success
    } else {
        Outcome::Failure
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_steps_keep_the_chart_one_column_per_point() {
        assert_eq!(auto_step(0), 1);
        assert_eq!(auto_step(30_000), 1);
        assert_eq!(auto_step(59_000), 1);
        assert_eq!(auto_step(60_000), 2);
        assert_eq!(auto_step(10 * 60_000), 15);
        assert_eq!(auto_step(3_600_000), 120);
        assert_eq!(auto_step(24 * 3_600_000), 1800);
        for range in [1, 999, 59_000, 61_000, 600_000, 3_600_000, 86_400_000] {
            let step = i64::from(auto_step(range)) * 1000;
            // Points: at most one more than the steps in the range (alignment of the first).
            let points = (range + step - 1) / step + 1;
            assert!(points <= chart::MAX_WIDTH as i64, "{range}");
        }
    }

    #[test]
    fn the_chart_fits_in_60_columns() {
        let counts: Vec<u64> = (0..500).map(|i| i % 7).collect();
        let lines = chart_lines(&counts, "1s", Some(0), Some(499_000));
        assert!(lines.iter().all(|l| l.chars().count() <= 60), "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains('█')));
        let lines = chart_lines(&[0, 0], "10s", Some(0), Some(10_000));
        assert!(lines.iter().any(|l| l.contains("no hits")));
        assert!(chart_lines(&[], "1s", None, None).is_empty());
    }
}
