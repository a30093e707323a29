coroutine.wrap(function() while true do end end)()
function handle() end
