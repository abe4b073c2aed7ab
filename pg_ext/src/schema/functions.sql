-- AS-OF access on both time axes, corrections, erase.

CREATE FUNCTION liminal.runs_as_of(valid_at timestamptz, known_at timestamptz DEFAULT now())
RETURNS TABLE (id text, plan_name text, status text, input_digest text, host text,
               started_at timestamptz, finished_at timestamptz, exit_code int,
               image_digest text, reason text)
LANGUAGE sql STABLE AS $$
    SELECT run_id, plan_name, status, input_digest, host, started_at, finished_at,
           exit_code, image_digest, reason
    FROM liminal.run_versions
    WHERE valid_from <= valid_at AND valid_at < valid_to
      AND tx_from <= known_at AND known_at < tx_to
$$;
COMMENT ON FUNCTION liminal.runs_as_of(timestamptz, timestamptz) IS
    'Runs as they were at valid time VALID_AT, according to what the database knew at KNOWN_AT (default: now). A run that had not started at VALID_AT is absent.';

CREATE FUNCTION liminal.test_results_as_of(valid_at timestamptz, known_at timestamptz DEFAULT now())
RETURNS TABLE (id text, run_id text, test_name text, status text, started_at timestamptz,
               duration_ms bigint, message text, correction_reason text)
LANGUAGE sql STABLE AS $$
    SELECT id, run_id, test_name, status, started_at, duration_ms, message, correction_reason
    FROM liminal.test_result_versions
    WHERE valid_from <= valid_at AND valid_at < valid_to
      AND tx_from <= known_at AND known_at < tx_to
$$;
COMMENT ON FUNCTION liminal.test_results_as_of(timestamptz, timestamptz) IS
    'Test results valid at VALID_AT as known at KNOWN_AT: with KNOWN_AT before a correction, the result as first classified.';

CREATE FUNCTION liminal.signals_as_of(valid_at timestamptz, known_at timestamptz DEFAULT now())
RETURNS TABLE (id text, run_id text, test_result_id text, kind text, name text,
               at timestamptz, value jsonb, attrs jsonb)
LANGUAGE sql STABLE AS $$
    SELECT id, run_id, test_result_id, kind, name, at, value, attrs
    FROM liminal.signal_versions
    WHERE valid_from <= valid_at AND valid_at < valid_to
      AND tx_from <= known_at AND known_at < tx_to
$$;
COMMENT ON FUNCTION liminal.signals_as_of(timestamptz, timestamptz) IS
    'Signals written at or before VALID_AT (a signal holds from its time on), as known at KNOWN_AT.';

CREATE FUNCTION liminal.artifacts_as_of(valid_at timestamptz, known_at timestamptz DEFAULT now())
RETURNS TABLE (id text, run_id text, path text, blake3 text, size bigint)
LANGUAGE sql STABLE AS $$
    SELECT id, run_id, path, blake3, size
    FROM liminal.artifact_versions
    WHERE valid_from <= valid_at AND valid_at < valid_to
      AND tx_from <= known_at AND known_at < tx_to
$$;
COMMENT ON FUNCTION liminal.artifacts_as_of(timestamptz, timestamptz) IS
    'Artifacts valid at VALID_AT as known at KNOWN_AT.';

CREATE FUNCTION liminal.correct_test_result(id text, status text, reason text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    cur liminal.test_result_versions;
    vt timestamptz;
    new_version bigint;
BEGIN
    IF status IS NULL OR status NOT IN ('passed', 'failed', 'skipped', 'error') THEN
        RAISE EXCEPTION 'invalid test status %', quote_nullable(status)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'one of passed, failed, skipped, error';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a correction needs a reason' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO cur FROM liminal.test_result_versions v
     WHERE v.id = correct_test_result.id AND v.tx_to = 'infinity' AND v.valid_to = 'infinity'
     FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no test result %', quote_nullable(correct_test_result.id)
            USING ERRCODE = 'no_data_found';
    END IF;
    -- Same valid time, new belief: only the transaction time of the old
    -- version closes.
    vt := liminal._make_room('liminal.test_result_versions', 'id', cur.id, cur.valid_from);
    INSERT INTO liminal.test_result_versions
        (id, run_id, test_name, status, started_at, duration_ms, message, correction_reason,
         valid_from, valid_to, fact_id, source)
    VALUES (cur.id, cur.run_id, cur.test_name, correct_test_result.status, cur.started_at,
            cur.duration_ms, cur.message, reason, cur.valid_from, vt, liminal.new_ulid(), 'correction')
    RETURNING version_id INTO new_version;
    RETURN new_version;
END
$$;
COMMENT ON FUNCTION liminal.correct_test_result(text, text, text) IS
    'Re-classify test result ID as STATUS (passed|failed|skipped|error) for REASON: adds a version with the same valid time and closes the old version''s transaction time. Returns the new version_id.';

-- Replace SECRET in every string (keys included) of a jsonb value.
CREATE FUNCTION liminal._redact_jsonb(j jsonb, secret text) RETURNS jsonb
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE jsonb_typeof(j)
        WHEN 'string' THEN to_jsonb(replace(j #>> '{}', secret, '***'))
        WHEN 'object' THEN (SELECT coalesce(jsonb_object_agg(replace(k, secret, '***'), liminal._redact_jsonb(v, secret)), '{}'::jsonb)
                            FROM jsonb_each(j) AS e(k, v))
        WHEN 'array'  THEN (SELECT coalesce(jsonb_agg(liminal._redact_jsonb(v, secret) ORDER BY i), '[]'::jsonb)
                            FROM jsonb_array_elements(j) WITH ORDINALITY AS a(v, i))
        ELSE j
    END
$$;
COMMENT ON FUNCTION liminal._redact_jsonb(jsonb, text) IS 'Internal: SECRET replaced by *** in every string and key of J.';

CREATE FUNCTION liminal.erase(run_id text DEFAULT NULL, secret text DEFAULT NULL)
RETURNS TABLE (table_name text, rows bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    esc text;
BEGIN
    IF (erase.run_id IS NULL) = (erase.secret IS NULL) THEN
        RAISE EXCEPTION 'liminal.erase needs exactly one of run_id, secret' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF erase.run_id IS NOT NULL THEN
        -- Every version of everything the run produced.
        FOREACH table_name IN ARRAY ARRAY['signal_versions', 'test_result_versions', 'artifact_versions',
                                          'repro_verdict_versions', 'run_versions'] LOOP
            EXECUTE format('DELETE FROM liminal.%I WHERE run_id = $1', table_name) USING erase.run_id;
            GET DIAGNOSTICS n = ROW_COUNT;
            rows := n;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    -- A short needle would shred unrelated text.
    IF length(erase.secret) < 4 THEN
        RAISE EXCEPTION 'secret to erase must be at least 4 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The secret as it appears inside JSON text (quotes, backslashes escaped).
    esc := substr(to_jsonb(erase.secret)::text, 2, length(to_jsonb(erase.secret)::text) - 2);
    UPDATE liminal.signal_versions s
       SET name = replace(s.name, erase.secret, '***'),
           value = liminal._redact_jsonb(s.value, erase.secret),
           attrs = liminal._redact_jsonb(s.attrs, erase.secret)
     WHERE strpos(s.name, erase.secret) > 0 OR strpos(s.value::text, esc) > 0 OR strpos(s.attrs::text, esc) > 0;
    GET DIAGNOSTICS n = ROW_COUNT;
    table_name := 'signal_versions'; rows := n; RETURN NEXT;
    UPDATE liminal.test_result_versions t
       SET message = replace(t.message, erase.secret, '***'),
           correction_reason = replace(t.correction_reason, erase.secret, '***')
     WHERE strpos(t.message, erase.secret) > 0 OR strpos(t.correction_reason, erase.secret) > 0;
    GET DIAGNOSTICS n = ROW_COUNT;
    table_name := 'test_result_versions'; rows := n; RETURN NEXT;
    UPDATE liminal.run_versions r
       SET reason = replace(r.reason, erase.secret, '***')
     WHERE strpos(r.reason, erase.secret) > 0;
    GET DIAGNOSTICS n = ROW_COUNT;
    table_name := 'run_versions'; rows := n; RETURN NEXT;
    UPDATE liminal.ingest_errors e
       SET payload = replace(replace(e.payload, erase.secret, '***'), esc, '***'),
           reason = replace(e.reason, erase.secret, '***')
     WHERE strpos(e.payload, erase.secret) > 0 OR strpos(e.payload, esc) > 0 OR strpos(e.reason, erase.secret) > 0;
    GET DIAGNOSTICS n = ROW_COUNT;
    table_name := 'ingest_errors'; rows := n; RETURN NEXT;
END
$$;
COMMENT ON FUNCTION liminal.erase(text, text) IS
    'For data that must go. erase(run_id => R) deletes every version of run R and of everything it produced; erase(secret => S) replaces S by *** in every version of signals (name, value, attrs), test result messages, run reasons and ingest_errors. Returns the rows touched per table. Old tuples stay on disk until VACUUM: run VACUUM on the tables it names afterwards.';
