-- finnstream.quotes_latest: one row per (symbol, minute), the best record the archive has for
-- it: the quote if there is one, else the candle, else the gap record (which says why); among
-- records of the same source, the latest fetched. Duplicates (delivery is at least once) and
-- late records (a candle in a later day's folder) collapse into that one row.
--
-- Run it once in Athena (engine v3) to create or update the view. The view has no year/month/day:
-- a record's folder is the day it ARRIVED, not its minute's day, so a filter on them cannot be
-- pushed through the deduplication, and a query on the view reads the whole archive. Filter on
-- "minute" for correct rows; for a cheap scan of a few days, query finnstream.quotes with a
-- folder filter instead (see deploy/athena/missing_slots.sql).
CREATE OR REPLACE VIEW finnstream.quotes_latest AS
SELECT
  "schema", symbol, "minute", source, price, open, high, low, previous_close, change,
  change_percent, volume, quote_time, fetched_at, reason
FROM (
  SELECT
    q.*,
    row_number() OVER (
      PARTITION BY q.symbol, q."minute"
      ORDER BY
        CASE q.source WHEN 'quote' THEN 1 WHEN 'candle' THEN 2 WHEN 'gap' THEN 3 ELSE 4 END,
        q.fetched_at DESC
    ) AS preference
  FROM finnstream.quotes AS q
)
WHERE preference = 1
