"""The guard itself: its values (``model``) and its state machine (``core``). Pure: no I/O, no clock, no asyncio."""
