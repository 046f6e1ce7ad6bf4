// The console page's strings, in English and Korean. Every message is complete in each language
// (no sentence is assembled from pieces of both); `{code}` and `{name}` are filled in by console.js.
// Close codes: DESIGN.md section 8.

export const LANGUAGES = ["en", "ko"];

export const STRINGS = {
    en: {
        "title": "Console",
        "title.vm": "{name} — Console",
        "status.loading": "Loading the console…",
        "status.connecting": "Connecting to the console…",
        "status.reconnecting": "Connection lost. Reconnecting…",
        "status.connected": "Connected",
        "status.connected.vm": "Connected to {name}",
        "status.connected.viewonly": "Connected (view only)",
        "status.connected.viewonly.vm": "Connected to {name} (view only)",
        "notice.recorded": "This session is recorded.",
        "status.disconnecting": "Disconnecting…",
        "status.ready": "Ready. Press Connect to open the console.",
        "status.notoken": "This console link has no token. Open the console again from the management portal.",
        "status.badport": "The console link has an invalid port number.",
        "status.nowebsocket": "The browser could not open a connection to the console proxy.",
        "status.security": "The console server rejected the connection.",
        "status.reason": "Details from the server: {reason}",

        "close.4001": "The console link is not valid. Open the console again from the management portal.",
        "close.4002": "The console link has expired. Open the console again from the management portal to get a new link.",
        "close.4003": "This console link has already been used; each link works only once. Open the console again from the management portal.",
        "close.4004": "Access to this console is not allowed from here (browser origin, your address or the virtual machine's address was refused).",
        "close.4005": "The console could not be reconnected: its reconnect permission was already used, has expired, or is not valid from your address. Open the console again from the management portal.",
        "close.4008": "The console proxy cannot open this console right now: too many consoles are open, or it is busy. Close another console, or wait a moment, and open the console again.",
        "close.4010": "The virtual machine's host could not be reached. Try again later, or contact your administrator.",
        "close.4011": "The console proxy could not log in to the virtual machine's VNC server (authentication failed).",
        "close.4012": "The console session ended: it was idle for too long or reached its time limit.",
        "close.4013": "The console session was ended by an administrator, or replaced by a newer console for this virtual machine.",
        "close.1001": "The console proxy is shutting down. Open the console again to reach another proxy.",
        "close.1000": "The console was disconnected.",
        "close.1006": "The connection to the console proxy was lost.",
        "close.generic": "The console connection was closed (code {code}).",

        "btn.connect": "Connect",
        "btn.cad": "Ctrl+Alt+Del",
        "btn.cad.title": "Send Ctrl+Alt+Del to the virtual machine",
        "menu.fkeys": "Ctrl+Alt+F…",
        "menu.fkeys.title": "Send Ctrl+Alt and a function key (switch virtual terminals)",
        "btn.ctrl": "Ctrl",
        "btn.alt": "Alt",
        "btn.win": "Win",
        "btn.sticky.title": "Hold this key down until pressed again",
        "btn.type": "Type text",
        "btn.clipboard": "Clipboard",
        "btn.help": "Help",
        "btn.fullscreen": "Full screen",
        "label.display": "Display",
        "display.fit": "Fit to window",
        "display.native": "Actual size (1:1)",
        "display.remote": "Resize the remote screen",

        "type.heading": "Type text",
        "type.intro": "The text below is typed into the virtual machine as key presses on the keyboard layout you choose. Use it for passwords or commands when the guest has no clipboard. Korean is typed on the 2-set (dubeolsik) keys, with 한/영 switches.",
        "type.label": "Text to type",
        "type.send": "Type into the VM",
        "type.enter": "Press Enter after the text",
        "type.sent": "Typed {count} characters.",

        "clip.heading": "Clipboard",
        "clip.intro": "Text copied inside the virtual machine appears here, for VNC servers that share their clipboard. Text sent from here is put on the virtual machine's clipboard.",
        "clip.label": "Clipboard text",
        "clip.send": "Send to the VM clipboard",
        "clip.sent": "Sent to the VM clipboard.",
        "clip.received": "Received from the VM clipboard.",

        "help.heading": "Help",
        "help.keyboard": "Keyboard: your own keyboard layout works. Key presses are sent with QEMU's extended key events, which carry the physical key's scan code, so the guest applies its own layout (set the guest's layout to match your keyboard).",
        "help.keys": "Key combinations the browser keeps for itself (such as Ctrl+Alt+Del) can be sent with the buttons in the toolbar. Ctrl, Alt and Win stay pressed until you press the button again.",
        "help.type": "Type text types the text on the keyboard layout you choose for the virtual machine (US, Korean, German, French, Japanese, UK); characters that layout cannot type are listed before anything is sent. Long texts are typed at the speed you choose, with pause and cancel.",
        "help.display": "Display: Fit to window scales the screen; Actual size shows it pixel for pixel; Resize the remote screen asks the VNC server to match your window, where the server supports it.",
        "help.viewonly": "This console is view only: keyboard and mouse input are not sent.",
        "help.close": "Close",
        "btn.hanyeong.title": "Send the 한/영 key (Korean/English input switch) to the virtual machine",
        "btn.hanja.title": "Send the 한자 key (Hanja conversion) to the virtual machine",
        "btn.osk": "Keyboard",
        "btn.osk.title": "Show the on-screen keyboard (touch devices); what you type goes to the virtual machine",
        "type.layout": "Keyboard layout of the virtual machine",
        "layout.us": "English (US)",
        "layout.ko": "Korean (2-set)",
        "layout.de": "German",
        "layout.fr": "French",
        "layout.ja": "Japanese",
        "layout.uk": "English (UK)",
        "type.ime": "The virtual machine's Korean input mode right now",
        "type.ime.en": "English",
        "type.ime.ko": "Korean",
        "type.rate": "Typing speed (keys per second)",
        "type.untypable": "These characters cannot be typed with the {layout} layout and will be skipped: {chars}",
        "type.anyway": "Type the rest",
        "type.pause": "Pause",
        "type.resume": "Resume",
        "type.cancel": "Cancel",
        "type.progress": "Typing… {done} of {total} keys.",
        "type.paused": "Paused after {done} of {total} keys.",
        "type.cancelled": "Cancelled after {done} of {total} keys.",
        "type.nothing": "Nothing to type.",
        "type.ralt": "On my keyboard, Right Alt is 한/영 and Right Ctrl is 한자",
        "ime.hint": "Your computer's Korean input method is composing: switch it to English, then use the 한/영 button or key to type Korean in the virtual machine.",
        "help.korean": "Korean: the 한/영 and 한자 buttons (and those keys on your keyboard) switch the virtual machine's input method. Keep your own computer's input method in English so that key presses reach the virtual machine as they are; the virtual machine's input method composes Hangul.",
    },
    ko: {
        "title": "콘솔",
        "title.vm": "{name} — 콘솔",
        "status.loading": "콘솔을 불러오는 중입니다…",
        "status.connecting": "콘솔에 연결하는 중입니다…",
        "status.reconnecting": "연결이 끊어졌습니다. 다시 연결하는 중입니다…",
        "status.connected": "연결됨",
        "status.connected.vm": "{name}에 연결됨",
        "status.connected.viewonly": "연결됨 (보기 전용)",
        "status.connected.viewonly.vm": "{name}에 연결됨 (보기 전용)",
        "notice.recorded": "이 세션은 녹화되고 있습니다.",
        "status.disconnecting": "연결을 끊는 중입니다…",
        "status.ready": "준비되었습니다. 연결 버튼을 눌러 콘솔을 여십시오.",
        "status.notoken": "이 콘솔 링크에는 토큰이 없습니다. 관리 화면에서 콘솔을 다시 여십시오.",
        "status.badport": "콘솔 링크의 포트 번호가 올바르지 않습니다.",
        "status.nowebsocket": "브라우저가 콘솔 프록시에 연결을 열지 못했습니다.",
        "status.security": "콘솔 서버가 연결을 거부했습니다.",
        "status.reason": "서버가 보낸 상세 내용: {reason}",

        "close.4001": "콘솔 링크가 올바르지 않습니다. 관리 화면에서 콘솔을 다시 여십시오.",
        "close.4002": "콘솔 링크가 만료되었습니다. 관리 화면에서 콘솔을 다시 열어 새 링크를 받으십시오.",
        "close.4003": "이 콘솔 링크는 이미 사용되었습니다. 링크는 한 번만 사용할 수 있으니 관리 화면에서 콘솔을 다시 여십시오.",
        "close.4004": "이 위치에서는 이 콘솔에 접근할 수 없습니다 (브라우저 출처, 사용자 주소 또는 가상 머신 주소가 거부됨).",
        "close.4005": "콘솔에 다시 연결하지 못했습니다. 재연결 권한이 이미 사용되었거나 만료되었거나 현재 주소에서는 사용할 수 없습니다. 관리 화면에서 콘솔을 다시 여십시오.",
        "close.4008": "지금은 콘솔을 열 수 없습니다. 열려 있는 콘솔이 너무 많거나 프록시가 바쁩니다. 다른 콘솔을 닫거나 잠시 기다린 뒤 콘솔을 다시 여십시오.",
        "close.4010": "가상 머신의 호스트에 연결할 수 없습니다. 잠시 후 다시 시도하거나 관리자에게 문의하십시오.",
        "close.4011": "콘솔 프록시가 가상 머신의 VNC 서버에 로그인하지 못했습니다 (인증 실패).",
        "close.4012": "콘솔 세션이 종료되었습니다. 너무 오래 사용하지 않았거나 사용 시간 한도에 도달했습니다.",
        "close.4013": "관리자가 콘솔 세션을 종료했거나, 이 가상 머신의 새 콘솔이 열려 기존 세션을 대체했습니다.",
        "close.1001": "콘솔 프록시가 종료 중입니다. 콘솔을 다시 열면 다른 프록시로 연결됩니다.",
        "close.1000": "콘솔 연결이 끊어졌습니다.",
        "close.1006": "콘솔 프록시와의 연결이 끊어졌습니다.",
        "close.generic": "콘솔 연결이 종료되었습니다 (코드 {code}).",

        "btn.connect": "연결",
        "btn.cad": "Ctrl+Alt+Del",
        "btn.cad.title": "가상 머신에 Ctrl+Alt+Del 보내기",
        "menu.fkeys": "Ctrl+Alt+F…",
        "menu.fkeys.title": "Ctrl+Alt와 기능 키 보내기 (가상 터미널 전환)",
        "btn.ctrl": "Ctrl",
        "btn.alt": "Alt",
        "btn.win": "Win",
        "btn.sticky.title": "다시 누를 때까지 이 키를 누른 상태로 유지",
        "btn.type": "텍스트 입력",
        "btn.clipboard": "클립보드",
        "btn.help": "도움말",
        "btn.fullscreen": "전체 화면",
        "label.display": "화면",
        "display.fit": "창에 맞추기",
        "display.native": "실제 크기 (1:1)",
        "display.remote": "원격 화면 크기 조정",

        "type.heading": "텍스트 입력",
        "type.intro": "아래 텍스트를 선택한 키보드 배열의 키 입력으로 가상 머신에 보냅니다. 게스트에 클립보드가 없을 때 비밀번호나 명령을 입력하는 데 사용하십시오. 한글은 두벌식 자판의 키와 한/영 전환으로 입력됩니다.",
        "type.label": "입력할 텍스트",
        "type.send": "가상 머신에 입력",
        "type.enter": "텍스트 뒤에 Enter 키 누르기",
        "type.sent": "{count}개 문자를 입력했습니다.",

        "clip.heading": "클립보드",
        "clip.intro": "클립보드를 공유하는 VNC 서버의 경우, 가상 머신 안에서 복사한 텍스트가 여기에 나타납니다. 여기에서 보낸 텍스트는 가상 머신의 클립보드에 들어갑니다.",
        "clip.label": "클립보드 텍스트",
        "clip.send": "가상 머신 클립보드로 보내기",
        "clip.sent": "가상 머신 클립보드로 보냈습니다.",
        "clip.received": "가상 머신 클립보드에서 받았습니다.",

        "help.heading": "도움말",
        "help.keyboard": "키보드: 사용 중인 키보드 배열을 그대로 쓸 수 있습니다. 키 입력은 물리적 키의 스캔 코드를 담은 QEMU 확장 키 이벤트로 전송되므로 게스트가 자체 키보드 배열을 적용합니다 (게스트의 키보드 배열을 사용자의 키보드에 맞추십시오).",
        "help.keys": "브라우저가 가로채는 키 조합(예: Ctrl+Alt+Del)은 도구 모음의 버튼으로 보낼 수 있습니다. Ctrl, Alt, Win 버튼은 다시 누를 때까지 눌린 상태로 유지됩니다.",
        "help.type": "텍스트 입력은 가상 머신에 맞게 선택한 키보드 배열(미국, 한국어, 독일어, 프랑스어, 일본어, 영국)로 텍스트를 입력합니다. 그 배열로 입력할 수 없는 문자는 보내기 전에 표시됩니다. 긴 텍스트는 선택한 속도로 입력되며 일시 정지와 취소가 가능합니다.",
        "help.display": "화면: 창에 맞추기는 화면을 창 크기에 맞게 배율 조정하고, 실제 크기는 픽셀 그대로 보여 주며, 원격 화면 크기 조정은 VNC 서버가 지원하는 경우 창 크기에 맞추도록 요청합니다.",
        "help.viewonly": "이 콘솔은 보기 전용입니다. 키보드와 마우스 입력은 전송되지 않습니다.",
        "help.close": "닫기",
        "btn.hanyeong.title": "가상 머신에 한/영 키(한글/영문 입력 전환) 보내기",
        "btn.hanja.title": "가상 머신에 한자 키(한자 변환) 보내기",
        "btn.osk": "키보드",
        "btn.osk.title": "화면 키보드 표시 (터치 기기). 입력한 내용은 가상 머신으로 전송됩니다",
        "type.layout": "가상 머신의 키보드 배열",
        "layout.us": "영어 (미국)",
        "layout.ko": "한국어 (두벌식)",
        "layout.de": "독일어",
        "layout.fr": "프랑스어",
        "layout.ja": "일본어",
        "layout.uk": "영어 (영국)",
        "type.ime": "가상 머신의 현재 한글 입력 상태",
        "type.ime.en": "영문",
        "type.ime.ko": "한글",
        "type.rate": "입력 속도 (초당 키 수)",
        "type.untypable": "{layout} 배열로는 다음 문자를 입력할 수 없어 건너뜁니다: {chars}",
        "type.anyway": "나머지 입력",
        "type.pause": "일시 정지",
        "type.resume": "계속",
        "type.cancel": "취소",
        "type.progress": "입력하는 중… 키 {total}개 중 {done}개.",
        "type.paused": "키 {total}개 중 {done}개를 입력한 뒤 일시 정지했습니다.",
        "type.cancelled": "키 {total}개 중 {done}개를 입력한 뒤 취소했습니다.",
        "type.nothing": "입력할 내용이 없습니다.",
        "type.ralt": "내 키보드에서는 오른쪽 Alt가 한/영, 오른쪽 Ctrl이 한자 키입니다",
        "ime.hint": "컴퓨터의 한글 입력기가 글자를 조합하고 있습니다. 입력기를 영문으로 바꾼 뒤 한/영 버튼이나 키로 가상 머신에서 한글을 입력하십시오.",
        "help.korean": "한글: 한/영, 한자 버튼(및 키보드의 해당 키)은 가상 머신의 입력기를 전환합니다. 키 입력이 그대로 가상 머신에 전달되도록 사용자 컴퓨터의 입력기는 영문으로 두십시오. 한글 조합은 가상 머신의 입력기가 합니다.",
    },
};

// Pick "ko" or "en": the `language=` parameter first (ko, ko-KR, en, en-US…), then the browser's
// preferred languages; English when nothing matches.
export function pickLanguage(param, browserLanguages) {
    const candidates = [];
    if (param) {
        candidates.push(param);
    }
    for (const l of browserLanguages || []) {
        candidates.push(l);
    }
    for (const c of candidates) {
        const base = String(c).toLowerCase().split(/[-_]/)[0];
        if (LANGUAGES.includes(base)) {
            return base;
        }
    }
    return "en";
}

export function translator(lang) {
    const table = STRINGS[lang] || STRINGS.en;
    return (key, vars) => {
        let s = table[key];
        if (s === undefined) {
            s = STRINGS.en[key] !== undefined ? STRINGS.en[key] : key;
        }
        if (vars) {
            s = s.replace(/\{(\w+)\}/g, (m, k) => (k in vars ? String(vars[k]) : m));
        }
        return s;
    };
}
