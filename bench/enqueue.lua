-- wrk: POST a small noop task with the bearer key from TG_KEY (empty for the bare endpoints)
wrk.method = "POST"
wrk.body = '{"kind": "noop", "payload": {"order": 42}}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("TG_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
