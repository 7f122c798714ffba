"""The web client in a real browser: one-to-one and group chat, marks, typing, presence, files."""

from __future__ import annotations

import io
import random
import re

from PIL import Image
from playwright.async_api import FilePayload, expect

from tests.web.conftest import Web


async def test_direct_chat_both_ways(web: Web) -> None:
    alice = await web.user("alice", register_in_page=True)
    await web.shot(alice.page, "02-conversation-list-empty")
    bob = await web.user("bob")

    # Alice finds Bob by name and writes; her message shows at once, then as stored and delivered.
    await alice.open_chat_with(bob)
    await alice.send("Hello Bob!")
    mine = alice.message("Hello Bob!")
    await expect(mine).to_have_count(1)
    await expect(mine).to_have_class("msg mine")
    await expect(mine.locator(".status")).to_have_text("Delivered")

    # Bob sees it in his list, unread, with its preview; opening it marks it read on Alice's side.
    item = bob.conversation(alice.display)
    await expect(item.locator(".badge")).to_have_text("1")
    await expect(item.locator(".conv-preview")).to_have_text("Hello Bob!")
    await web.shot(bob.page, "03-conversation-list")
    await web.assert_readable(bob.page)
    # Bob uses the keyboard only: from the search box down to the conversation, Enter opens it and puts
    # him in the message box.
    await bob.page.focus("#search")
    await bob.page.keyboard.press("ArrowDown")
    await expect(item).to_be_focused()
    await bob.page.keyboard.press("Enter")
    await expect(bob.page.locator("#chat-title")).to_have_text(alice.display)
    await expect(bob.page.locator("#message-input")).to_be_focused()
    await expect(bob.message("Hello Bob!")).to_have_class("msg theirs")
    await expect(item.locator(".badge")).to_have_count(0)
    await expect(mine.locator(".status")).to_have_text("Read")
    # Online dots: each sees the other online (presence is polled on opening a conversation).
    await expect(bob.page.locator("#chat-subtitle")).to_have_text("online")

    # Typing shows on the other side; then Bob answers.
    await bob.page.keyboard.type("Hi Al")
    await expect(alice.page.locator("#typing")).to_have_text(f"{bob.display} is typing…")
    await bob.page.keyboard.type("ice, how are you?")
    await bob.page.keyboard.press("Enter")
    await expect(alice.message("Hi Alice, how are you?")).to_have_class("msg theirs")
    await expect(alice.page.locator("#typing")).to_have_text("")
    await expect(bob.message("Hi Alice, how are you?").locator(".status")).to_have_text("Read")
    await alice.send("Fine, thanks. A multi-line\nmessage <b>with markup</b> stays text.")
    await expect(bob.page.locator("#messages li.msg .text").last).to_have_text(
        "Fine, thanks. A multi-line\nmessage <b>with markup</b> stays text."
    )
    assert await bob.page.locator("#messages b").count() == 0, "user text must never become markup"
    await alice.page.reload()  # the session survives a reload ...
    await expect(alice.page.locator("#chat-title")).to_have_text(bob.display)  # ... and the open conversation
    await expect(alice.texts).to_have_text(
        ["Hello Bob!", "Hi Alice, how are you?", "Fine, thanks. A multi-line\nmessage <b>with markup</b> stays text."]
    )
    await expect(alice.page.locator("#chat-subtitle")).to_have_text("online")
    await web.shot(alice.page, "04-direct-chat")
    await web.assert_readable(alice.page)

    # Log out: back to the login screen, and a reload stays there.
    await alice.page.click("#logout")
    await expect(alice.page.locator("#login-view")).to_be_visible()
    await alice.page.reload()
    await expect(alice.page.locator("#login-view")).to_be_visible()
    await expect(alice.page.locator("#app-view")).to_be_hidden()
    await web.shot(alice.page, "01-login")
    await web.assert_readable(alice.page)


async def test_group_of_three(web: Web) -> None:
    alice = await web.user("alice")
    bob = await web.user("bob")
    carol = await web.user("carol")
    await bob.open_chat_with(alice)
    await bob.send("psst, are you planning something?")
    chats = alice.page.locator("#conv-list .conv .conv-title")
    await expect(chats).to_have_text([bob.display])

    # Alice creates a group with Bob and Carol through the dialog (keyboard: Escape closes it first).
    page = alice.page
    await page.click("#new-group")
    await expect(page.locator("#group-dialog")).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(page.locator("#group-dialog")).to_be_hidden()
    await page.click("#new-group")
    await page.fill("#group-name", "Weekend trip")
    for other in (bob, carol):
        await page.fill("#group-search", other.name[:5])
        await page.locator("#group-results button", has_text=other.display).click()
    await expect(page.locator("#group-chips .chip")).to_have_count(2)
    await page.click("#group-create")
    await expect(page.locator("#chat-title")).to_have_text("Weekend trip")
    await expect(page.locator("#messages li.system").first).to_have_text("You created the group “Weekend trip”")
    await expect(page.locator("#chat-subtitle")).to_contain_text("3 members")
    await expect(chats).to_have_text(["Weekend trip", bob.display])  # newest activity first

    await alice.send("Who's in for Saturday?")
    status = alice.message("Who's in for Saturday?").locator(".status")
    await expect(status).to_have_text("Delivered to 2 of 2")
    await bob.open_conversation("Weekend trip")
    await expect(status).to_have_text("Read by 1 of 2")
    await carol.open_conversation("Weekend trip")
    await expect(status).to_have_text("Read by 2 of 2")

    # Replies carry their sender's name; everyone sees the same order.
    await bob.send("Me!")
    await expect(carol.message("Me!").locator(".sender")).to_have_text(bob.display)
    await expect(carol.page.locator("#conv-list .conv-preview")).to_have_text(f"{bob.display}: Me!")
    await carol.send("Count me in too")
    for user in (alice, bob, carol):
        await expect(user.texts).to_have_text(["Who's in for Saturday?", "Me!", "Count me in too"])
    await expect(carol.message("Count me in too").locator(".status")).to_have_text("Read by 2 of 2")
    await web.shot(alice.page, "05-group-chat-read-marks")
    await web.assert_readable(alice.page)
    await web.assert_readable(carol.page)

    # The owner removes Carol: everyone sees it, and Carol can no longer write.
    await page.click("#members-button")
    members = page.locator("#members-list .member")
    await expect(members).to_have_count(3)
    await web.shot(alice.page, "06-group-members")
    await members.filter(has_text=carol.display).get_by_role("button", name=f"Remove {carol.display}").click()
    await expect(members).to_have_count(2)
    await page.keyboard.press("Escape")
    await expect(page.locator("#members-dialog")).to_be_hidden()
    for user in (alice, bob):
        await expect(user.page.locator("#messages li.system").last).to_have_text(
            f"{'You' if user is alice else alice.display} removed {carol.display}"
        )
    await expect(carol.page.locator("#left-note")).to_be_visible()
    await expect(carol.page.locator("#composer")).to_be_hidden()
    # ... and adds her back.
    await page.click("#members-button")
    await page.fill("#members-search", carol.name[:5])
    await page.locator("#members-results button", has_text=carol.display).click()
    await expect(members).to_have_count(3)
    await page.get_by_role("button", name="Done").click()
    await expect(carol.page.locator("#composer")).to_be_visible()
    await carol.send("Back again")
    await expect(bob.message("Back again")).to_have_count(1)

    # A direct message moves that conversation back to the top of Alice's list, unread.
    await bob.open_conversation(alice.display)
    await bob.send("one more thing")
    await expect(chats).to_have_text([bob.display, "Weekend trip"])
    await expect(alice.conversation(bob.display).locator(".badge")).to_have_text("2")


def picture(width: int, height: int) -> bytes:
    """A PNG gradient with grain: pleasant to look at, yet barely compressible (the upload takes time)."""
    rng = random.Random(5)
    img = Image.new("RGB", (width, height))
    img.putdata(
        [
            (
                20 + x * 200 // width + rng.randrange(24),
                90 + y * 120 // height + rng.randrange(24),
                200 - rng.randrange(24),
            )
            for y in range(height)
            for x in range(width)
        ]
    )
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


async def test_image_and_file(web: Web) -> None:
    alice = await web.user("alice")
    bob = await web.user("bob")
    await alice.open_chat_with(bob)
    await alice.send("Look at this")
    await bob.open_conversation(alice.display)

    # An image: picked with the file input, uploaded (slowly: the upload is throttled) with a progress bar
    # that moves, shown on both sides.
    data = picture(320, 200)
    assert len(data) > 100_000
    cdp = await alice.context.new_cdp_session(alice.page)
    await cdp.send("Network.enable")
    slow = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 60_000}
    await cdp.send("Network.emulateNetworkConditions", slow)
    await alice.page.set_input_files(
        "#file-input", files=[FilePayload(name="gradient.png", mimeType="image/png", buffer=data)]
    )
    await alice.page.wait_for_function(
        """() => {
            const p = document.querySelector("#messages li.pending progress.upload");
            return p !== null && p.value > 0 && p.value < 100
                && p.closest("li").querySelector(".status").textContent.includes(`Uploading ${p.value} %`);
        }""",
        polling=50,
    )
    await expect(alice.page.locator("#messages progress.upload")).to_have_count(0)
    await cdp.send("Network.emulateNetworkConditions", {**slow, "uploadThroughput": -1})
    for user in (alice, bob):
        img = user.page.locator("#messages li.msg img.image")
        await expect(img).to_have_count(1)
        await expect(img).to_have_attribute("alt", "gradient.png")
        # Rendered from a blob: URL (the file endpoint needs the bearer token), decoded at its real size.
        await expect(img).to_have_attribute("src", re.compile(r"^blob:"))
        await user.page.wait_for_function(
            "() => { const i = document.querySelector('#messages img.image');"
            " return i !== null && i.complete && i.naturalWidth > 0 }"
        )
        assert await img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [320, 200]
        await expect(user.page.locator("#messages li.pending")).to_have_count(0)
    await expect(alice.page.locator("#messages li.msg.has-image .status")).to_have_text("Read")
    await expect(bob.page.locator("#conv-list .conv-preview")).to_have_text("Photo")
    await web.shot(bob.page, "07-image-message")

    # A file: dropped on the conversation, downloaded by Bob through the access-checked endpoint.
    data = b"minutes of the meeting\n" * 100
    await alice.page.evaluate(
        """([name, text]) => {
            const dt = new DataTransfer();
            dt.items.add(new File([text], name, {type: "text/plain"}));
            const target = document.querySelector("#messages-wrap");
            for (const type of ["dragenter", "dragover", "drop"]) {
                target.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
            }
        }""",
        ["minutes.txt", data.decode()],
    )
    file_item = bob.page.locator("#messages li.msg .file", has_text="minutes.txt")
    await expect(file_item).to_have_count(1)
    async with bob.page.expect_download() as download_info:
        await file_item.get_by_role("button", name="Download").click()
    download = await download_info.value
    assert download.suggested_filename == "minutes.txt"
    path = await download.path()
    assert path.read_bytes() == data

    # An upload that fails (the network is gone) is marked as not sent, with a Retry that works.
    await alice.context.set_offline(True)
    await alice.page.set_input_files(
        "#file-input", files=[FilePayload(name="notes.txt", mimeType="text/plain", buffer=b"take two\n")]
    )
    failed = alice.page.locator("#messages li.pending", has_text="notes.txt")
    await expect(failed.locator(".status")).to_have_text("Not sent")
    await expect(failed.get_by_role("alert")).to_contain_text("The upload failed: no connection to the server.")
    await web.shot(alice.page, "07b-upload-failed")
    await alice.context.set_offline(False)
    await failed.get_by_role("button", name="Retry").click()
    await expect(bob.page.locator("#messages li.msg .file", has_text="notes.txt")).to_have_count(1)
    await expect(alice.page.locator("#messages li.pending")).to_have_count(0)
