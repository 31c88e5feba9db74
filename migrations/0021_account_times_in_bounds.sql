-- Builds before 0020 accepted a sweep of year 0 (`sweep --month 0000-01`), which stored a
-- refill month before year 1: 0020's check then refused every later write of that account
-- (a decision for the user dead-lettered as a defect). Such a value is moved to the nearest
-- bound, which the rules read the same way (a month, day or request time long past, or far
-- ahead), so the account can be written again. Values within the bounds, and nulls, stay.
UPDATE credit.balances
   SET refill_month = CASE WHEN refill_month NOT BETWEEN '0001-01-01' AND '9999-12-01'
                           THEN LEAST(GREATEST(refill_month, '0001-01-01'), '9999-12-01')
                           ELSE refill_month END,
       fee_day = CASE WHEN fee_day NOT BETWEEN '0001-01-01' AND '9999-12-31'
                      THEN LEAST(GREATEST(fee_day, '0001-01-01'), '9999-12-31')
                      ELSE fee_day END,
       auto_requested_at =
           CASE WHEN auto_requested_at
                     NOT BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'
                THEN LEAST(GREATEST(auto_requested_at, '0001-01-01 00:00:00+00'),
                           '9999-12-31 23:59:59+00')
                ELSE auto_requested_at END
 WHERE refill_month NOT BETWEEN '0001-01-01' AND '9999-12-01'
    OR fee_day NOT BETWEEN '0001-01-01' AND '9999-12-31'
    OR auto_requested_at NOT BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00';
