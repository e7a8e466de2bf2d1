-- The archive's gap report: one row per expected minute slot of the regular session that has
-- no `quote` or `candle` record, with the reason of the slot's `gap` record when it has one.
--
-- Athena engine v3. Two positional parameters, each used once, in this order:
--   1. the first trading day (DATE)    2. the last trading day (DATE)
-- e.g. aws athena start-query-execution ... --execution-parameters "DATE '2025-06-16'" "DATE '2025-06-20'"
--
-- Reads finnstream.quotes (the Firehose archive) and finnstream.sessions (the CSV printed by
-- `finnstream sessions --start ... --end ...`, under s3://<archive bucket>/sessions/).
-- * Expected slots: every minute of every session in the range, for every symbol with any record
--   (any source) whose minute falls on a day of the range. A (symbol, day) with no record at all
--   is reported minute by minute.
-- * Records are deduplicated on (symbol, minute): delivery is at least once.
-- * Folders are by ARRIVAL day (UTC), so backfilled candles and gap records, and records spooled
--   through an outage, sit in later folders. The scan reaches 7 days past the last day
--   (LATE_DAYS below; deploy/README-deploy.md, "Gap report", says why 7). A day less than a week
--   old can still lose rows when it is queried again.
-- * Trino inlines a WITH query at each use, so the folders are read twice (for the symbols and
--   for the slots): data scanned is about twice the (days + 7) folders.
--
-- Output columns: symbol, minute (bigint), trading_day (date), gap_reason (varchar or null).
WITH params AS (
  SELECT
    first_day,
    last_day,
    -- Folders compare as text ('2025-06-16'): projection also yields folders such as day=31 of
    -- June, which a date parse would reject. The inner CAST keeps `last_day + 7 days` a date on
    -- engines where date + interval is a timestamp.
    CAST(first_day AS varchar) AS first_folder,
    CAST(CAST(last_day + INTERVAL '7' DAY AS date) AS varchar) AS last_folder,  -- LATE_DAYS
    -- [range_start, range_end): the range's days in epoch seconds (UTC days; a New York session
    -- never crosses midnight UTC)
    date_diff('day', DATE '1970-01-01', first_day) * 86400 AS range_start,
    (date_diff('day', DATE '1970-01-01', last_day) + 1) * 86400 AS range_end
  FROM (SELECT CAST(? AS date) AS first_day, CAST(? AS date) AS last_day)
),
records AS (
  SELECT q.symbol, q."minute", q.source, q.reason, q.fetched_at
  FROM finnstream.quotes AS q
  CROSS JOIN params AS p
  WHERE concat(q.year, '-', q.month, '-', q.day) BETWEEN p.first_folder AND p.last_folder
    AND q."minute" >= p.range_start
    AND q."minute" < p.range_end
),
slots AS (
  SELECT
    symbol,
    "minute",
    bool_or(source IN ('quote', 'candle')) AS filled,
    -- the latest gap record's reason when a slot has several (a later pass may say more)
    max_by(reason, fetched_at) FILTER (WHERE source = 'gap') AS gap_reason
  FROM records
  GROUP BY symbol, "minute"
),
symbols AS (
  SELECT DISTINCT symbol FROM records
),
calendar AS (
  -- DISTINCT: a day uploaded twice (overlapping files under sessions/) still counts once
  SELECT DISTINCT s.trading_day, s.open_minute, s.close_minute
  FROM finnstream.sessions AS s
  CROSS JOIN params AS p
  WHERE s.trading_day BETWEEN p.first_day AND p.last_day
),
expected AS (
  SELECT y.symbol, c.trading_day, m."minute"
  FROM calendar AS c
  CROSS JOIN symbols AS y
  CROSS JOIN UNNEST(sequence(c.open_minute, c.close_minute - 1, 60)) AS m ("minute")
)
SELECT e.symbol, e."minute", e.trading_day, g.gap_reason
FROM expected AS e
LEFT JOIN slots AS g
  ON g.symbol = e.symbol AND g."minute" = e."minute"
WHERE g.filled IS NULL OR NOT g.filled
ORDER BY e.symbol, e."minute"
