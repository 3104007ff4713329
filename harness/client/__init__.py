"""The one client: asyncio connections (:mod:`.conn`), the behaviours faults plan
(:mod:`.behaviours`), plans and their schedules (:mod:`.plan`), and the engine that performs
them in this process or in forked workers (:mod:`.engine`)."""
