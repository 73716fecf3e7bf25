-- session_timeouts --
-- Run on every new connection: the server ends this session if it idles
-- inside a transaction, and probes its TCP peer as libpq's keepalives do
-- (ignored on a Unix socket).
SELECT set_config('idle_in_transaction_session_timeout', %(idle)s, false),
       set_config('tcp_keepalives_idle', %(keepalive_idle)s, false),
       set_config('tcp_keepalives_interval', %(keepalive_interval)s, false),
       set_config('tcp_keepalives_count', %(keepalive_count)s, false);
