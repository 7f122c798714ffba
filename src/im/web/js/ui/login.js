// The login / create-account screen.

import { $ } from "../dom.js";

const MESSAGES = {
  bad_credentials: "Wrong user name or password.",
  conflict: "That user name is taken. Try another one.",
};

/** Show the login view; resolves once the user has logged in (the Api then holds tokens). */
export function showLogin(api, notice = "") {
  const view = $("#login-view");
  const form = $("#login-form");
  const error = $("#login-error");
  const submit = $("#login-submit");
  const tabLogin = $("#tab-login");
  const tabRegister = $("#tab-register");
  const registerOnly = view.querySelectorAll(".register-only");
  const password = $("#login-password");
  let registering = false;

  function setMode(register) {
    registering = register;
    tabLogin.setAttribute("aria-selected", String(!register));
    tabRegister.setAttribute("aria-selected", String(register));
    for (const el of registerOnly) el.hidden = !register;
    submit.textContent = register ? "Create account" : "Log in";
    password.autocomplete = register ? "new-password" : "current-password";
    error.textContent = "";
  }

  view.hidden = false;
  $("#app-view").hidden = true;
  error.textContent = notice;
  setMode(false);
  $("#login-username").focus();

  return new Promise((resolve) => {
    tabLogin.onclick = () => setMode(false);
    tabRegister.onclick = () => setMode(true);
    // Arrow keys move between the two tabs (the tablist pattern).
    view.querySelector("[role=tablist]").onkeydown = (e) => {
      if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
        setMode(!registering);
        (registering ? tabRegister : tabLogin).focus();
      }
    };
    form.onsubmit = async (e) => {
      e.preventDefault();
      const username = form.username.value.trim();
      const pw = form.password.value;
      if (username.length < 3) {
        error.textContent = "A user name has at least 3 characters.";
        form.username.focus();
        return;
      }
      if (pw.length < 8) {
        error.textContent = "A password has at least 8 characters.";
        form.password.focus();
        return;
      }
      submit.disabled = true;
      error.textContent = "";
      try {
        if (registering) await api.register(username, pw, form.display_name.value.trim());
        await api.login(username, pw);
        form.password.value = "";
        view.hidden = true;
        resolve();
      } catch (err) {
        error.textContent = MESSAGES[err.code] || err.message || "Something went wrong; try again.";
      } finally {
        submit.disabled = false;
      }
    };
  });
}
