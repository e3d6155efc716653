-- wrk script for bench/flash-sale.sh: each request is a purchase attempt by a
-- random user of FS_USERS (`u0` ...) for a random item of FS_ITEMS
-- (`<FS_PREFIX>0` ...), with an Idempotency-Key of its own. FS_TOKENS names a file
-- of bearer tokens, one per user (sent through the gateway, whose `auth` forwards
-- the token's subject as `x-user-id`); without it the user goes as `x-user-id`
-- (straight to the service). Answers are counted by status and printed at the end.

local users = tonumber(os.getenv("FS_USERS") or "20000")
local items = tonumber(os.getenv("FS_ITEMS") or "10")
local prefix = os.getenv("FS_PREFIX") or "item"
local token_file = os.getenv("FS_TOKENS")
local tokens = {}
local n = 0
statuses = {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  if token_file and token_file ~= "" then
    for line in io.lines(token_file) do
      tokens[#tokens + 1] = "Bearer " .. line
    end
  end
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function request()
  n = n + 1
  local u = math.random(users)
  local headers = {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = "k" .. n .. "-" .. math.random(1000000000),
  }
  if #tokens > 0 then
    headers["Authorization"] = tokens[u]
  else
    headers["x-user-id"] = "u" .. (u - 1)
  end
  local body = '{"item":"' .. prefix .. (math.random(items) - 1) .. '"}'
  return wrk.format("POST", "/buy", headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for k, v in pairs(s) do
      total[k] = (total[k] or 0) + v
    end
  end
  local parts = {}
  for k, v in pairs(total) do
    parts[#parts + 1] = k .. "=" .. v
  end
  table.sort(parts)
  io.write("statuses " .. table.concat(parts, " ") .. "\n")
  io.write(string.format("latency_us p50 %d p99 %d\n", latency:percentile(50), latency:percentile(99)))
end
