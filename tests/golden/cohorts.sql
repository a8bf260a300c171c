-- Cohort SQL over the synthetic catalog (participants, diagnoses, labs, specimens,
-- variants), as clinical researchers write it. Each query is planned at ε = 1 and its
-- outcome recorded in tests/tests/snapshots/: the EXPLAIN table of an accepted query (node
-- request, row bound R, sensitivities), or the refusal with its message. Queries are
-- separated by a line holding only `;`. Headings (`-- #`) name the issue's six parts.

-- # 1. Per-participant derived tables and CTEs
SELECT COUNT(*) FROM (SELECT DISTINCT pid FROM diagnoses WHERE code = 'E11') t
;
SELECT COUNT(*) FROM (SELECT pid FROM labs WHERE test = 'HbA1c' GROUP BY pid HAVING COUNT(*) >= 3) t
;
SELECT COUNT(*) FROM (SELECT pid FROM labs WHERE test = 'HbA1c' GROUP BY pid HAVING COUNT(*) > 5) t
;
WITH diabetic AS (SELECT DISTINCT pid FROM diagnoses WHERE code = 'E11') SELECT COUNT(*) FROM diabetic
;
SELECT year(first_on) AS y, COUNT(*) FROM (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'I21' GROUP BY pid) f GROUP BY 1
;
SELECT AVG(n) FROM (SELECT pid, COUNT(*) AS n FROM labs WHERE test = 'HbA1c' GROUP BY pid) t
;
SELECT COUNT(*) FROM (SELECT pid, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn FROM labs WHERE test = 'HbA1c') t WHERE rn = 1
;
SELECT COUNT(*) FROM (SELECT pid, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY diagnosed_on) AS rn FROM diagnoses WHERE code = 'E11') t WHERE rn = 2
;
SELECT COUNT(*) FROM (SELECT pid, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY diagnosed_on) AS rn FROM diagnoses WHERE code = 'E11') t WHERE rn <= 2
;
SELECT COUNT(*) FROM (SELECT pid, bool_or(code = 'E11') AS dm FROM diagnoses GROUP BY pid) t WHERE dm
;
SELECT AVG(n) FROM (SELECT pid, COUNT(DISTINCT code) AS n FROM diagnoses GROUP BY pid) t
;
SELECT COUNT(*) FROM (SELECT pid, COUNT(*) FILTER (WHERE code = 'E11') AS n_e11, COUNT(*) FILTER (WHERE code = 'N18') AS n_n18 FROM diagnoses GROUP BY pid) t WHERE n_e11 >= 2 AND n_n18 >= 1
;
SELECT AVG(a1c) FROM (SELECT pid, MAX(CASE WHEN test = 'HbA1c' THEN value END) AS a1c FROM labs GROUP BY pid) t
;
SELECT AVG(sd) FROM (SELECT pid, STDDEV(value) AS sd FROM labs WHERE test = 'HbA1c' GROUP BY pid HAVING COUNT(*) >= 3) t
;
SELECT CASE WHEN m >= 6.5 THEN 'high' ELSE 'not high' END AS median_hba1c, COUNT(*) FROM (SELECT pid, MEDIAN(value) AS m FROM labs WHERE test = 'HbA1c' GROUP BY pid) t GROUP BY 1
;
SELECT COUNT(*) FROM (SELECT pid, SUM(CASE WHEN code = 'E11' THEN 1 ELSE 0 END) AS n FROM diagnoses GROUP BY pid) t WHERE n >= 2
;
SELECT COUNT(*) FROM (SELECT pid, SUM(CASE WHEN code = 'E11' THEN 1 END) AS n FROM diagnoses GROUP BY pid) t WHERE n >= 2
;
SELECT COUNT(*) FROM (SELECT pid, first_value(code ORDER BY diagnosed_on) FILTER (WHERE code LIKE 'E%') AS c FROM diagnoses GROUP BY pid) t WHERE c = 'E11'
;

-- # 2. Semi-joins and anti-joins on the participant
SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11')
;
SELECT sex, COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') AND pid NOT IN (SELECT pid FROM diagnoses WHERE code = 'I10') GROUP BY sex
;
SELECT COUNT(*) FROM participants p WHERE EXISTS (SELECT 1 FROM diagnoses d WHERE d.pid = p.pid AND d.code LIKE 'E1%')
;
SELECT COUNT(*) FROM participants p WHERE NOT EXISTS (SELECT 1 FROM specimens s WHERE s.pid = p.pid AND s.status = 'stored')
;
SELECT test, COUNT(*), AVG(value) FROM labs l WHERE NOT EXISTS (SELECT 1 FROM diagnoses d WHERE d.pid = l.pid AND d.code = 'E11') GROUP BY test
;
SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11' INTERSECT SELECT pid FROM diagnoses WHERE code = 'N18')
;
SELECT COUNT(*) FROM (SELECT pid FROM diagnoses WHERE code = 'E11' INTERSECT SELECT pid FROM diagnoses WHERE code = 'N18') t
;
SELECT COUNT(*) FROM (SELECT pid FROM diagnoses WHERE code = 'E11' EXCEPT SELECT pid FROM diagnoses WHERE code = 'I10') t
;
SELECT COUNT(*) FROM (SELECT pid FROM diagnoses WHERE code = 'C50' UNION SELECT pid FROM diagnoses WHERE code = 'C34') t
;
SELECT COUNT(*) FROM (SELECT pid FROM diagnoses WHERE code = 'C50' UNION SELECT pid FROM variants WHERE gene = 'BRCA1') t
;
SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'C50' UNION SELECT pid FROM variants WHERE gene = 'BRCA1')
;
SELECT pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') AS diabetic, COUNT(*) FROM participants GROUP BY 1
;
SELECT CASE WHEN pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') THEN 'E11' ELSE 'no E11' END AS dm, sex, COUNT(*) FROM participants GROUP BY 1, sex
;
SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'N18' AND pid IN (SELECT pid FROM labs WHERE test = 'creatinine'))
;
SELECT p.sex, COUNT(*), AVG(l.value) FROM labs l JOIN participants p USING (pid) WHERE l.test = 'HbA1c' AND l.pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') GROUP BY p.sex
;
SELECT COUNT(*) FROM participants WHERE birth_year < 1960 OR pid IN (SELECT pid FROM variants WHERE gene = 'APOE' AND zygosity = 'hom')
;
SELECT kind, SUM(volume_ml) FROM specimens WHERE status = 'stored' AND pid IN (SELECT pid FROM diagnoses WHERE code = 'C50') GROUP BY kind
;
SELECT COUNT(*) FROM diagnoses WHERE code IN (SELECT code FROM diagnoses WHERE diagnosed_on < DATE '2010-01-01')
;
SELECT COUNT(*) FROM participants WHERE EXISTS (SELECT 1 FROM diagnoses WHERE code = 'E11')
;
SELECT COUNT(*) FROM participants p WHERE EXISTS (SELECT 1 FROM diagnoses d WHERE d.pid = p.pid AND d.diagnosed_on > p.enrolled_on)
;
SELECT COUNT(*) FROM participants WHERE pid IN (SELECT code FROM diagnoses)
;
SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses GROUP BY pid HAVING MAX(diagnosed_on) > DATE '2020-01-01')
;
SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11' LIMIT 10)
;
SELECT COUNT(*) FROM participants WHERE birth_year > (SELECT AVG(birth_year) FROM participants)
;

-- # 3. Tables joined on the participant
SELECT v.gene, COUNT(*) FROM diagnoses d JOIN variants v USING (pid) WHERE d.code = 'E11' GROUP BY v.gene
;
SELECT COUNT(DISTINCT d.pid) FROM diagnoses d JOIN specimens s USING (pid) WHERE d.code = 'E11' AND s.kind = 'serum'
;
SELECT p.sex, COUNT(*) FROM participants p JOIN diagnoses d USING (pid) JOIN labs l USING (pid) WHERE d.code = 'E11' AND l.test = 'HbA1c' GROUP BY p.sex
;
SELECT COUNT(*) FROM diagnoses a JOIN diagnoses b USING (pid) WHERE a.code = 'E11' AND b.code = 'I10'
;
SELECT p.sex, COUNT(d.pid) FROM participants p LEFT JOIN diagnoses d ON d.pid = p.pid AND d.code = 'E11' GROUP BY p.sex
;
SELECT COUNT(*) FROM diagnoses d JOIN variants v ON d.code = v.variant
;
SELECT a.code, b.code, COUNT(DISTINCT pid) FROM diagnoses a JOIN diagnoses b USING (pid) WHERE a.code < b.code GROUP BY 1, 2
;
SELECT COUNT(*) FROM participants p LEFT JOIN (SELECT * FROM specimens WHERE kind = 'serum') s USING (pid) WHERE s.pid IS NULL
;
SELECT COUNT(*) FROM diagnoses d RIGHT JOIN participants p USING (pid)
;
SELECT COUNT(DISTINCT p.pid) FROM participants p JOIN diagnoses d USING (pid) JOIN labs l USING (pid) JOIN specimens s USING (pid) WHERE d.code = 'E11' AND l.test = 'HbA1c' AND l.value >= 6.5 AND s.kind = 'serum'
;
SELECT COUNT(DISTINCT p.pid) FROM participants p JOIN diagnoses d ON d.pid = p.pid JOIN labs l ON l.pid = p.pid JOIN specimens s ON s.pid = p.pid WHERE d.code = 'E11' AND l.test = 'HbA1c' AND l.value >= 6.5 AND s.kind = 'serum'
;
SELECT p.sex, COUNT(d.pid), COUNT(s.pid) FROM participants p LEFT JOIN diagnoses d ON d.pid = p.pid AND d.code = 'N18' LEFT JOIN specimens s ON s.pid = p.pid AND s.kind = 'serum' GROUP BY p.sex
;
SELECT COUNT(DISTINCT a.pid) FROM diagnoses a JOIN diagnoses b USING (pid) JOIN diagnoses c ON c.pid = a.pid WHERE a.code = 'E11' AND b.code = 'I10' AND c.code = 'N18'
;
SELECT COUNT(*) FROM participants p LEFT JOIN diagnoses d USING (pid) JOIN labs l ON l.pid = d.pid
;
SELECT COUNT(*) FROM (SELECT pid, MIN(diagnosed_on) AS f FROM diagnoses WHERE code = 'E11' GROUP BY pid) a JOIN (SELECT pid, MIN(diagnosed_on) AS f FROM diagnoses WHERE code = 'N18' GROUP BY pid) b USING (pid) WHERE a.f < b.f
;
WITH e11 AS (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'E11' GROUP BY pid), a1c AS (SELECT pid, MIN(measured_on) AS first_a1c FROM labs WHERE test = 'HbA1c' GROUP BY pid) SELECT COUNT(*) FROM e11 JOIN a1c USING (pid) WHERE a1c.first_a1c > e11.first_on
;
SELECT p.sex, COUNT(*), COUNT(f.first_on) FROM participants p LEFT JOIN (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'E11' GROUP BY pid) f ON f.pid = p.pid GROUP BY p.sex
;
WITH latest AS (SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn FROM labs WHERE test = 'HbA1c') SELECT p.sex, COUNT(*) FROM participants p JOIN latest l USING (pid) WHERE l.rn = 1 AND l.value >= 6.5 GROUP BY p.sex
;
WITH latest AS (SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn FROM labs WHERE test = 'HbA1c') SELECT COUNT(*) FROM participants p LEFT JOIN latest l ON l.pid = p.pid WHERE l.rn = 1
;

-- # 4. Expressions
SELECT COUNT(*) FROM diagnoses WHERE year(diagnosed_on) = 2020
;
SELECT year(diagnosed_on) AS y, COUNT(*) FROM diagnoses WHERE code = 'E11' GROUP BY 1
;
SELECT EXTRACT(MONTH FROM measured_on) AS m, COUNT(*) FROM labs WHERE test = 'HbA1c' AND year(measured_on) >= 2020 GROUP BY 1
;
SELECT date_part('quarter', enrolled_on) AS q, COUNT(*) FROM participants GROUP BY 1
;
SELECT COUNT(*) FROM labs l JOIN participants p USING (pid) WHERE l.measured_on - p.enrolled_on > 365
;
SELECT CASE WHEN month(measured_on) <= 6 THEN 'first half' ELSE 'second half' END AS half, COUNT(*) FROM labs GROUP BY 1
;
SELECT COUNT(*) FROM participants WHERE day(enrolled_on) = 1
;
SELECT COUNT(*) FILTER (WHERE sex = 'F') FROM participants
;
SELECT SUM(CASE WHEN sex = 'F' THEN 1 ELSE 0 END) FROM participants
;
SELECT AVG(2026 - birth_year) FROM participants
;
WITH latest AS (SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn FROM labs WHERE test = 'HbA1c') SELECT CASE WHEN value >= 6.5 THEN 'high' ELSE 'not high' END AS category, COUNT(*) FROM latest WHERE rn = 1 GROUP BY 1
;
SELECT COUNT(*) FROM (SELECT pid, first_value(code ORDER BY diagnosed_on) AS first_code FROM diagnoses GROUP BY pid) t WHERE first_code = 'E11'
;
SELECT COUNT(*) FROM (SELECT pid, RANK() OVER (PARTITION BY pid ORDER BY measured_on) AS r FROM labs) t WHERE r = 1
;
SELECT has_e11, COUNT(*) FROM (SELECT pid, bool_or(code = 'E11') AS has_e11 FROM diagnoses GROUP BY pid) t GROUP BY has_e11
;
SELECT AVG(total) FROM (SELECT pid, SUM(volume_ml) AS total FROM specimens WHERE status = 'stored' GROUP BY pid) t
;
SELECT AVG(year(f.first_on) - p.birth_year) FROM (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'I21' GROUP BY pid) f JOIN participants p USING (pid)
;
SELECT AVG(age) FROM (SELECT f.pid, year(f.first_on) - p.birth_year AS age FROM (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'I21' GROUP BY pid) f JOIN participants p USING (pid)) t
;
WITH cohort AS (SELECT pid, sex, 2026 - birth_year AS age FROM participants WHERE participant_type = 'general') SELECT sex, COUNT(*), AVG(age) FROM cohort WHERE age >= 40 GROUP BY sex
;
SELECT age_group, COUNT(*) FROM (SELECT pid, CASE WHEN birth_year < 1960 THEN 'older' ELSE 'younger' END AS age_group FROM participants) t GROUP BY age_group
;
SELECT COUNT(*) FROM (SELECT pid, pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') AS dm FROM participants) t WHERE dm
;
SELECT COUNT(*) FROM (SELECT a.pid FROM (SELECT pid, MIN(diagnosed_on) AS f FROM diagnoses WHERE code = 'E11' GROUP BY pid) a JOIN (SELECT pid, MIN(diagnosed_on) AS f FROM diagnoses WHERE code = 'N18' GROUP BY pid) b USING (pid) WHERE a.f < b.f) t
;
SELECT COUNT(DISTINCT t.pid) FROM (SELECT l.pid, l.value, p.sex FROM labs l JOIN participants p USING (pid)) t WHERE t.sex = 'F' AND t.value > 7
;
SELECT sex, AVG(CASE WHEN pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') THEN 1.0 ELSE 0 END) FROM participants GROUP BY sex
;
SELECT COUNT(*), COUNT(*) FILTER (WHERE value > 7), AVG(value) FILTER (WHERE value > 7) FROM labs WHERE test = 'HbA1c'
;
SELECT MEDIAN(value) FILTER (WHERE test = 'HbA1c') FROM labs
;
SELECT date_trunc('month', measured_on) AS m, COUNT(*) FROM labs GROUP BY 1
;
SELECT COUNT(*) FROM labs WHERE measured_on > DATE '2026-12-07' - INTERVAL '1 year'
;
SELECT COUNT(*) FROM labs l JOIN participants p USING (pid) WHERE l.measured_on < p.enrolled_on + INTERVAL '1 year'
;
SELECT COUNT(*) FROM labs WHERE measured_on + INTERVAL '1 hour' > DATE '2020-01-01'
;
SELECT sex, MEDIAN(2026 - birth_year) AS median_age FROM participants GROUP BY sex
;
SELECT date_trunc('month', diagnosed_on) AS m, COUNT(*) FROM diagnoses WHERE code = 'E11' AND date_trunc('year', diagnosed_on) = DATE '2020-01-01' GROUP BY 1
;
SELECT date_trunc('week', diagnosed_on) AS w, COUNT(*) FROM diagnoses GROUP BY 1
;
SELECT date_trunc('quarter', enrolled_on) AS q, COUNT(*) FROM participants WHERE enrolled_on >= DATE '2024-01-01' GROUP BY 1
;
SELECT dayofweek(diagnosed_on) AS dow, COUNT(*) FROM diagnoses WHERE code = 'I21' GROUP BY 1
;
SELECT EXTRACT(WEEK FROM measured_on) AS w, COUNT(*) FROM labs WHERE test = 'HbA1c' AND isodow(measured_on) <= 5 GROUP BY 1
;
SELECT COUNT(*) FROM labs WHERE date_trunc('week', measured_on) = DATE '2024-03-04' AND dayofyear(measured_on) > 60
;

-- # 5. Several statistics in one query
SELECT sex, COUNT(*), AVG(birth_year), STDDEV(birth_year) FROM participants GROUP BY sex
;
SELECT test, COUNT(*), COUNT(DISTINCT pid), MEDIAN(value) FROM labs GROUP BY test
;
SELECT COUNT(*) * 1000.0 / (SELECT COUNT(*) FROM participants) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11')
;
SELECT sex, COUNT(*), (SELECT COUNT(*) FROM participants p2 WHERE p2.sex = p.sex) FROM participants p GROUP BY sex
;
SELECT sex, COUNT(*) AS cases, (SELECT COUNT(*) FROM participants p2 WHERE p2.sex = p.sex) AS total FROM participants p WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') GROUP BY sex
;
SELECT COUNT(*) / (SELECT COUNT(*) FROM diagnoses) FROM participants
;

-- # 6. A literal list is a public domain
SELECT code, COUNT(*) FROM diagnoses WHERE code IN ('C50', 'C34', 'C18') GROUP BY code
;
SELECT code, COUNT(DISTINCT pid) FROM diagnoses WHERE code = 'E11' GROUP BY code
;
SELECT d.code, p.sex, COUNT(*) FROM diagnoses d JOIN participants p USING (pid) WHERE d.code IN ('E11', 'I10') GROUP BY d.code, p.sex
;
SELECT variant, COUNT(*) FROM variants WHERE gene = 'BRCA2' AND variant IN ('c.68_69del', 'c.5266dupC') GROUP BY variant
;
SELECT kind, COUNT(*) FROM specimens WHERE kind IN ('serum', 'plasma') GROUP BY kind
;
SELECT code, COUNT(*) FROM diagnoses GROUP BY code
;
